"""``LipFlowModel``: encoders, decoder, inference-time encoders and latent flows composed into one
module.

Priors (attribute ``prior``), all sharing the encoder/decoder code:

- ``gaussian`` (DAM): p(z) = N(0, I); latent term = analytic KL(q(z|x) || N(0, I)).
- ``conditional_gaussian`` (ablation): p(z|c) = N(mu_c, sigma_c); analytic KL(q || p).
- ``lipflow``: log p(z|c) = log N(f^-1(z; h_c); mu_c, sigma_c) + log|det d f^-1/dz|; one-sample
Monte-Carlo
  KL = log q(z|x) - log p(z|c) with z ~ q(z|x) reparameterised.
- ``flow``: unconditional flow prior, log p(z) = log N(f^-1(z); 0, I) + log|det d f^-1/dz|;
Monte-Carlo KL.

Conditions (attribute ``conditions``, used by the two conditional priors): one inference-time
encoder E_c (and, for ``lipflow``, one flow) per condition name in {'keypoints', 'hmc',
'image_frontal'}. All are trained jointly on the same posterior samples and the latent term is the
mean over conditions, beta * mean_c (log q(z|x) - log p(z|c)), so one model carries e.g. both a
keypoint prior and an HMC prior sharing one decoder. The unconditional priors have a single prior,
keyed ``UNCONDITIONAL`` in the output dicts, and ignore ``conditions``.

Direct-encoder baseline: ``encoder_input='keypoints'|'hmc'|'image_frontal'`` replaces E_x by an
encoder of that signal (``DirectEncoder``, DAM output scaling); use it with ``prior='gaussian'``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lipflow_jax.models import decoder as dec
from lipflow_jax.models import encoders as enc
from lipflow_jax.models import flow as flw
from lipflow_jax.models import layers
from lipflow_jax.models.decoder import Decoder
from lipflow_jax.models.flow import LatentFlow

PRIORS = ("gaussian", "conditional_gaussian", "lipflow", "flow")
CONDITIONAL_PRIORS = ("conditional_gaussian", "lipflow")
ENCODER_INPUTS = ("x",) + enc.CONDITIONS
UNCONDITIONAL = "unconditional"


def decoder_of(model: "LipFlowModel") -> Decoder:
  """The ``Decoder`` of a model's fields (its params live under 'decoder'). Called outside a Flax
  module, an unbound one (for ``decoder.decode_vertex_subset``)."""
  return Decoder(
    model.tex_size,
    model.num_vertices,
    model.dec_z_features,
    model.dec_view_features,
    model.dec_start_size,
    model.dec_start_channels,
    tuple(model.dec_channels),
    model.dec_upsample,
    model.dec_untied_bias,
    model.num_cameras,
    model.weight_norm,
  )


class LipFlowModel(nn.Module):
  """LiP-Flow and its baselines (see the module docstring).

  Sizes are plain attributes; defaults are the small CPU model (64x64 textures). The Multiface full
  size is z_dim=256, tex_size=1024, num_vertices=7306, enc_channels=(16, 16, 32, 32, 64, 64, 128,
  128), enc_tex_features=enc_vert_features=dec_z_features=256, dec_start_channels=256,
  dec_channels=(256, 64, 64, 32, 32, 16, 16), dec_upsample='transpose', num_cameras=#cameras,
  weight_norm=True.

  Attributes:
    num_vertices: V (required).
    z_dim: Z.
    tex_size: T.
    prior: one of ``PRIORS``.
    conditions: condition names for the conditional priors (a subset of 'keypoints', 'hmc',
      'image_frontal').
    encoder_input: 'x' (E_x on avg_tex + verts) or a condition name (direct-encoder baseline).
    enc_*: E_x (see ``TexVertEncoder``). dec_*, num_cameras: the decoder (see ``Decoder``).
    context_dim, keypoint_*, hmc_*, image_channels: inference-time encoders (see ``ConditionNet``).
    flow_*: the latent flows (see ``LatentFlow``); flow_context: conditioners read h_c.
    weight_norm: weight-normalise the layers of E_x, the decoder and E_c (not the flows'
      conditioners).
  """

  num_vertices: int
  z_dim: int = 64
  tex_size: int = 64
  prior: str = "lipflow"
  conditions: Sequence[str] = ("keypoints",)
  encoder_input: str = "x"
  # E_x.
  enc_channels: Sequence[int] = (16, 32, 64, 64)
  enc_tex_features: int = 128
  enc_vert_features: int = 128
  # Decoder.
  dec_z_features: int = 128
  dec_view_features: int = 8
  dec_start_size: int = 4
  dec_start_channels: int = 64
  dec_channels: Sequence[int] = (64, 32, 16)
  dec_upsample: str = "resize"
  dec_untied_bias: bool = True
  num_cameras: int = 0
  weight_norm: bool = False
  # Inference-time encoders.
  context_dim: int = 128
  keypoint_image_size: Optional[Tuple[int, int]] = None
  keypoint_hidden: Sequence[int] = (256, 256)
  hmc_channels: Sequence[int] = (16, 32, 64)
  hmc_features: int = 64
  image_channels: Sequence[int] = (16, 32, 64, 64)
  prior_max_logstd: float = 5.0
  # Flows.
  flow_layers: int = 4
  flow_hidden: Sequence[int] = (128, 128)
  flow_bijector: str = "spline"
  flow_bins: int = 8
  flow_range: float = 5.0
  flow_mask: str = "checkerboard"
  flow_context: bool = True

  def __post_init__(self):
    super().__post_init__()
    if self.prior not in PRIORS:
      raise ValueError(f"Unknown prior {self.prior!r}; expected one of {PRIORS}.")
    if self.encoder_input not in ENCODER_INPUTS:
      raise ValueError(
        f"Unknown encoder_input {self.encoder_input!r}; expected one of {ENCODER_INPUTS}."
      )
    if isinstance(self.conditions, str):
      raise ValueError(
        f"conditions must be a sequence of names, got the string {self.conditions!r}."
      )
    for c in self.conditions:
      enc.check_condition(c)
    if len(set(self.conditions)) != len(tuple(self.conditions)):
      raise ValueError(f"Duplicate condition names in {tuple(self.conditions)}.")
    if self.prior in CONDITIONAL_PRIORS and not self.conditions:
      raise ValueError(f"Prior {self.prior!r} needs at least one condition.")
    if self.dec_upsample not in dec.UPSAMPLE_MODES:
      raise ValueError(
        f"Unknown dec_upsample {self.dec_upsample!r}; expected one of {dec.UPSAMPLE_MODES}."
      )
    dec.check_sizes(self.tex_size, self.dec_start_size, self.dec_channels)
    if self.flow_bijector not in flw.BIJECTORS:
      raise ValueError(
        f"Unknown flow_bijector {self.flow_bijector!r}; expected one of {flw.BIJECTORS}."
      )
    if self.flow_mask not in flw.MASKS:
      raise ValueError(f"Unknown flow_mask {self.flow_mask!r}; expected one of {flw.MASKS}.")
    if self.z_dim <= 0 or self.num_vertices is None or self.num_vertices <= 0:
      raise ValueError(
        f"z_dim and num_vertices must be positive, got {self.z_dim}, {self.num_vertices}."
      )
    if (
      self.prior in CONDITIONAL_PRIORS
      and "keypoints" in self.conditions
      or self.encoder_input == "keypoints"
    ) and self.keypoint_image_size is None:
      raise ValueError(
        "The 'keypoints' condition needs keypoint_image_size = (H, W) of the frontal image."
      )

  # ----------------------------------------------------------------------------------------- set-up

  def _condition_kwargs(self):
    return dict(
      features=self.context_dim,
      keypoint_image_size=self.keypoint_image_size,
      keypoint_hidden=tuple(self.keypoint_hidden),
      hmc_channels=tuple(self.hmc_channels),
      hmc_features=self.hmc_features,
      image_channels=tuple(self.image_channels),
      weight_norm=self.weight_norm,
    )

  def _flow(self, use_context):
    return LatentFlow(
      self.z_dim,
      self.flow_layers,
      tuple(self.flow_hidden),
      self.flow_bijector,
      self.flow_bins,
      self.flow_range,
      self.flow_mask,
      use_context,
    )

  def setup(self):
    if self.encoder_input == "x":
      self.encoder = enc.TexVertEncoder(
        self.z_dim,
        tuple(self.enc_channels),
        self.enc_tex_features,
        self.enc_vert_features,
        self.weight_norm,
      )
    else:
      self.encoder = enc.DirectEncoder(self.encoder_input, self.z_dim, **self._condition_kwargs())
    self.decoder = decoder_of(self)
    if self.is_conditional:
      self.condition_encoders = {
        c: enc.ConditionEncoder(
          c, self.z_dim, max_logstd=self.prior_max_logstd, **self._condition_kwargs()
        )
        for c in self.conditions
      }
    if self.prior == "lipflow":
      self.flows = {c: self._flow(self.flow_context) for c in self.conditions}
    elif self.prior == "flow":
      self.flows = {UNCONDITIONAL: self._flow(False)}

  @property
  def is_conditional(self) -> bool:
    return self.prior in CONDITIONAL_PRIORS

  @property
  def prior_names(self) -> Tuple[str, ...]:
    """Keys of the per-prior output dicts: the conditions, or (UNCONDITIONAL,)."""
    return tuple(self.conditions) if self.is_conditional else (UNCONDITIONAL,)

  def _check_name(self, name):
    if self.is_conditional:
      if name not in self.conditions:
        raise ValueError(
          f"Prior {self.prior!r}: name must be one of {tuple(self.conditions)}, got {name!r}."
        )
      return name
    return UNCONDITIONAL  # Unconditional priors ignore the name.

  # --------------------------------------------------------------------------- encoders and decoder

  def encode(self, avg_tex, verts):
    """E_x: avg_tex [B, T, T, 3], verts [B, V, 3] -> (mu [B, Z], logstd [B, Z])."""
    if self.encoder_input != "x":
      raise ValueError(
        f"This model's encoder reads {self.encoder_input!r}; use encode_input(batch)."
      )
    return self.encoder(avg_tex, verts)

  def encode_input(self, batch):
    """The posterior q(z|.) from a batch dict, whatever ``encoder_input`` is -> (mu [B, Z],
    logstd [B, Z])."""
    if self.encoder_input == "x":
      return self.encoder(batch["avg_tex"], batch["verts"])
    return self.encoder(batch)

  def decode(self, z, view, camera_index=None):
    """D: z [B, Z], view [B, 3], camera_index [B] int32 or None -> (tex [B, T, T, 3], verts [B,
    V, 3])."""
    return self.decoder(z, view, camera_index)

  def encode_condition(self, batch, name):
    """E_c for condition ``name`` -> (mu_c [B, Z], logstd_c [B, Z], h [B, context_dim])."""
    if not self.is_conditional:
      raise ValueError(f"Prior {self.prior!r} has no inference-time encoders.")
    return self.condition_encoders[self._check_name(name)](batch)

  # ------------------------------------------------------------------------------------------ flows

  def flow_forward(self, y, h, name=None):
    """z = f(y; h): y [..., B, Z], h [B, H] (None for the 'flow' prior) -> (z, log|det dz/dy|
    [..., B])."""
    if self.prior not in ("lipflow", "flow"):
      raise ValueError(f"Prior {self.prior!r} has no flow.")
    flow = self.flows[self._check_name(name)]
    return flow.forward(y, h if flow.use_context else None)

  def flow_inverse(self, z, h, name=None):
    """y = f^-1(z; h): z [..., B, Z], h [B, H] or None -> (y, log|det dy/dz| [..., B])."""
    if self.prior not in ("lipflow", "flow"):
      raise ValueError(f"Prior {self.prior!r} has no flow.")
    flow = self.flows[self._check_name(name)]
    return flow.inverse(z, h if flow.use_context else None)

  # ------------------------------------------------------------------------------------------ prior

  def prior_base(self, batch, name=None):
    """The prior's base Gaussian and flow context -> (mu [B, Z], logstd [B, Z], h [B, H] or None).

    E_c's output for the conditional priors; zeros (N(0, I)) and None for the unconditional ones.
    """
    name = self._check_name(name)
    if self.is_conditional:
      return self.encode_condition(batch, name)
    b = layers.batch_size_of(batch)
    zeros = jnp.zeros((b, self.z_dim), jnp.float32)
    return zeros, zeros, None

  def prior_log_prob_from_base(self, z, mu, logstd, h, name=None):
    """log p(z | c) from a precomputed ``prior_base`` (mu, logstd, h): z [..., B, Z] -> [..., B].

    For fitting loops: compute the base once per frame, then evaluate the prior at every step.
    """
    if self.prior in ("lipflow", "flow"):
      y, logdet = self.flow_inverse(z, h, name)
      return layers.gaussian_log_prob(y, mu, logstd) + logdet
    return layers.gaussian_log_prob(z, mu, logstd)

  def prior_log_prob(self, z, batch, name=None):
    """log p(z | c) (log p(z) for the unconditional priors): z [..., B, Z] -> [..., B].

    'gaussian' reads neither ``batch`` nor ``name``; 'flow' ignores ``name``.
    """
    if self.prior == "gaussian":
      return layers.gaussian_log_prob(z, 0.0, 0.0)
    mu, logstd, h = self.prior_base(batch, name)
    return self.prior_log_prob_from_base(z, mu, logstd, h, name)

  def prior_mode(self, batch, name=None):
    """The prior's 'mode', to initialise fitting -> [B, Z].

    f(mu_c; h) ('lipflow'), mu_c ('conditional_gaussian'), f(0) ('flow'), 0 ('gaussian'). For the
    flows this is the image of the base distribution's mode (not necessarily the mode of p(z|c)).
    """
    mu, _, h = self.prior_base(batch, name)
    if self.prior in ("lipflow", "flow"):
      return self.flow_forward(mu, h, name)[0]
    return mu

  def prior_sample(self, rng, batch, name=None, num_samples: int = 1):
    """z ~ p(z | c): -> [num_samples, B, Z]."""
    mu, logstd, h = self.prior_base(batch, name)
    eps = jax.random.normal(rng, (num_samples,) + mu.shape, mu.dtype)
    y = mu + jnp.exp(logstd) * eps
    if self.prior in ("lipflow", "flow"):
      return self.flow_forward(y, h, name)[0]
    return y

  # --------------------------------------------------------------------------------------- training

  def __call__(self, batch, train: bool = True):
    """One training forward pass.

    Draws z = mu + sigma * eps ~ q(z|x) with the 'sample' rng when ``train`` (z = mu otherwise),
    decodes it for this batch's view and camera, and evaluates every prior on z.

    Args:
      batch: dict of [B, ...] arrays (see the batch contract; unknown keys are ignored).
      train: sample z (True) or use the posterior mean (False).
    Returns:
      dict with mu, logstd, z [B, Z]; tex [B, T, T, 3]; verts [B, V, 3]; log_q [B] = log q(z|x);
      log_p, kl: {prior name: [B]} with log p(z|c) and the latent KL term (analytic for the Gaussian
      priors, log_q - log_p for the flow priors), both summed over the Z dimensions;
      for the conditional priors also prior_mu, prior_logstd: {condition: [B, Z]}.
    """
    mu, logstd = self.encode_input(batch)
    if train:
      eps = jax.random.normal(self.make_rng("sample"), mu.shape, mu.dtype)
    else:
      eps = jnp.zeros_like(mu)
    z = mu + jnp.exp(logstd) * eps
    # log q(z|x) at z = mu + sigma * eps, written with eps (exact, no division by sigma).
    log_q = jnp.sum(-0.5 * eps * eps - logstd - 0.5 * layers.LOG_2PI, axis=-1)
    tex, verts = self.decode(z, batch["view"], batch.get("camera_index"))

    out = dict(mu=mu, logstd=logstd, z=z, tex=tex, verts=verts, log_q=log_q, log_p={}, kl={})
    if self.is_conditional:
      out["prior_mu"], out["prior_logstd"] = {}, {}
    for name in self.prior_names:
      if self.is_conditional:
        p_mu, p_logstd, h = self.encode_condition(batch, name)
      else:
        p_mu, p_logstd, h = jnp.zeros_like(mu), jnp.zeros_like(mu), None
      out["log_p"][name] = self.prior_log_prob_from_base(z, p_mu, p_logstd, h, name)
      if self.prior in ("gaussian", "conditional_gaussian"):
        out["kl"][name] = layers.gaussian_kl(mu, logstd, p_mu, p_logstd)
      else:
        out["kl"][name] = log_q - out["log_p"][name]
      if self.is_conditional:
        out["prior_mu"][name], out["prior_logstd"][name] = p_mu, p_logstd
    return out
