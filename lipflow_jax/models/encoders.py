"""Encoders: the training-time encoder E_x and the inference-time encoders E_c.

- ``TexVertEncoder`` (E_x, DAM): x = (average texture, vertices) -> q(z|x) = N(mu_x, diag
exp(logstd_x)^2).
- ``ConditionNet``: an impoverished signal c -> features h [B, H] (one network per condition name):
  ``keypoints`` (MLP), ``hmc`` (a CNN branch per crop), ``image_frontal`` (CNN).
- ``ConditionEncoder`` (E_c): c -> (mu_c, logstd_c, h), the Gaussian p(y|c) and the flow context h.
- ``Regressor``: c -> a latent vector (DAM-Regressor baseline, same feature network as E_c).
- ``DirectEncoder``: c -> q(z|c) with DAM's output scaling (direct-encoder baseline).

Batch keys read per condition are listed in ``CONDITION_KEYS``; other keys are ignored.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from lipflow_jax.models import layers

CONDITIONS = ("keypoints", "hmc", "image_frontal")
CONDITION_KEYS = {
  "keypoints": ("keypoints", "keypoints_visible"),
  "hmc": ("hmc",),
  "image_frontal": ("image_frontal",),
}

# Small init of the Gaussian heads of E_c: p(y|c) starts close to N(0, I) without being degenerate.
_small_init = nn.initializers.variance_scaling(0.01, "fan_in", "truncated_normal")


def check_condition(condition: str):
  if condition not in CONDITIONS:
    raise ValueError(f"Unknown condition {condition!r}; expected one of {CONDITIONS}.")


def _require_keys(batch, condition):
  missing = [k for k in CONDITION_KEYS[condition] if k not in batch]
  if missing:
    raise ValueError(
      f"Condition {condition!r} needs batch keys {missing} (batch has {sorted(batch)})."
    )


class TexVertEncoder(nn.Module):
  """DAM training-time encoder E_x.

  avg_tex -> stride-2 4x4 convs (LeakyReLU 0.2) -> flatten -> dense ``tex_features``;
  verts -> flatten -> dense ``vert_features``; concat -> dense 2Z -> (0.1 * mean, 0.01 * log-std).

  Attributes:
    z_dim: latent size Z.
    channels: output channels of each stride-2 conv (Multiface full size: 16, 16, 32, 32, 64, 64,
      128, 128 on 1024x1024 textures -> 4x4x128).
    tex_features: width of the texture code (256 in Multiface).
    vert_features: width of the vertex code (256 in Multiface).
    weight_norm: weight-normalise every layer.
  """

  z_dim: int
  channels: Sequence[int] = (16, 32, 64, 64)
  tex_features: int = 128
  vert_features: int = 128
  weight_norm: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.z_dim <= 0:
      raise ValueError(f"z_dim must be positive, got {self.z_dim}.")

  @nn.compact
  def __call__(self, avg_tex, verts):
    """avg_tex: [B, T, T, 3], verts: [B, V, 3] -> (mu [B, Z], logstd [B, Z])."""
    wn = self.weight_norm
    t = layers.ConvTower(self.channels, self.tex_features, kernel=4, weight_norm=wn, name="tex")(
      avg_tex
    )
    v = verts.reshape(verts.shape[0], -1)
    v = layers.leaky_relu(layers.dense(self.vert_features, wn, name="verts")(v))
    out = layers.dense(2 * self.z_dim, wn, name="head")(jnp.concatenate([t, v], axis=-1))
    mu, logstd = jnp.split(out, 2, axis=-1)
    return 0.1 * mu, 0.01 * logstd


class KeypointNet(nn.Module):
  """MLP on 2D keypoints with their visibility.

  Keypoints are normalised to [-1, 1] by the frontal image size; invisible keypoints (visibility <
  0.5 or non-finite coordinates) are set to 0, so their values never reach the network; the
  visibility mask is
  concatenated: input [B, 3P] = [normalised xy (2P), visibility (P)].

  Attributes:
    image_size: (H, W) of the frontal camera's image, in pixels.
    hidden: widths of the hidden layers.
    features: output width H of the feature vector h.
  """

  image_size: Tuple[int, int]
  hidden: Sequence[int] = (256, 256)
  features: int = 128
  weight_norm: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.image_size is None or len(self.image_size) != 2 or min(self.image_size) <= 0:
      raise ValueError(
        "KeypointNet needs image_size = (H, W) of the frontal image in pixels, got "
        f"{self.image_size!r}."
      )

  @nn.compact
  def __call__(self, keypoints, visible):
    """keypoints: [B, P, 2] pixels (x right, y down), visible: [B, P] {0, 1} -> h [B, features]."""
    if keypoints.ndim != 3 or keypoints.shape[-1] != 2:
      raise ValueError(f"keypoints must be [B, P, 2], got {keypoints.shape}.")
    h_img, w_img = self.image_size
    scale = jnp.array([2.0 / w_img, 2.0 / h_img], jnp.float32)
    vis = (visible > 0.5) & jnp.all(jnp.isfinite(keypoints), axis=-1)
    kp = jnp.where(vis[..., None], keypoints * scale - 1.0, 0.0)
    x = jnp.concatenate([kp.reshape(kp.shape[0], -1), vis.astype(jnp.float32)], axis=-1)
    return layers.MLP(
      tuple(self.hidden) + (self.features,),
      activate_last=True,
      weight_norm=self.weight_norm,
      name="mlp",
    )(x)


class HMCNet(nn.Module):
  """CNN on headset-style crops with one branch (own weights) per crop; branch features
  concatenated.

  Attributes:
    channels: stride-2 conv channels of each branch.
    branch_features: width of each branch's output.
    features: output width H (dense on the concatenated branch features).
    num_crops: number of crops (3: left eye, right eye, mouth).
  """

  channels: Sequence[int] = (16, 32, 64)
  branch_features: int = 64
  features: int = 128
  num_crops: int = 3
  weight_norm: bool = False

  @nn.compact
  def __call__(self, hmc):
    """hmc: [B, num_crops, h, w, C] in [0, 1] -> h [B, features]."""
    if hmc.ndim != 5 or hmc.shape[1] != self.num_crops:
      raise ValueError(f"hmc must be [B, {self.num_crops}, h, w, C], got {hmc.shape}.")
    feats = [
      layers.ConvTower(
        self.channels,
        self.branch_features,
        kernel=3,
        weight_norm=self.weight_norm,
        name=f"branch_{i}",
      )(hmc[:, i] * 2.0 - 1.0)
      for i in range(self.num_crops)
    ]
    x = jnp.concatenate(feats, axis=-1)
    return layers.leaky_relu(layers.dense(self.features, self.weight_norm, name="dense")(x))


class ImageNet(nn.Module):
  """CNN on a low-resolution frontal image ``[B, h, w, C]`` in [0, 1] -> h [B, features]."""

  channels: Sequence[int] = (16, 32, 64, 64)
  features: int = 128
  weight_norm: bool = False

  @nn.compact
  def __call__(self, image):
    return layers.ConvTower(
      self.channels, self.features, kernel=3, weight_norm=self.weight_norm, name="tower"
    )(image * 2.0 - 1.0)


class ConditionNet(nn.Module):
  """Features h [B, features] of one impoverished signal, read from a batch dict.

  Attributes:
    condition: 'keypoints' | 'hmc' | 'image_frontal'.
    features: width H of h (the flow context).
    keypoint_image_size: (H, W) of the frontal image (required for 'keypoints').
    keypoint_hidden: hidden widths of the keypoint MLP.
    hmc_channels, hmc_features: conv channels and output width of each HMC branch.
    image_channels: conv channels of the frontal-image CNN.
  """

  condition: str
  features: int = 128
  keypoint_image_size: Optional[Tuple[int, int]] = None
  keypoint_hidden: Sequence[int] = (256, 256)
  hmc_channels: Sequence[int] = (16, 32, 64)
  hmc_features: int = 64
  image_channels: Sequence[int] = (16, 32, 64, 64)
  weight_norm: bool = False

  def __post_init__(self):
    super().__post_init__()
    check_condition(self.condition)
    if self.condition == "keypoints" and self.keypoint_image_size is None:
      raise ValueError(
        "The 'keypoints' condition needs keypoint_image_size = (H, W) of the frontal image."
      )

  @nn.compact
  def __call__(self, batch):
    """batch: dict with the keys of ``CONDITION_KEYS[condition]`` -> h [B, features]."""
    _require_keys(batch, self.condition)
    wn = self.weight_norm
    if self.condition == "keypoints":
      return KeypointNet(
        tuple(self.keypoint_image_size), self.keypoint_hidden, self.features, wn, name="net"
      )(batch["keypoints"], batch["keypoints_visible"])
    if self.condition == "hmc":
      return HMCNet(
        self.hmc_channels, self.hmc_features, self.features, weight_norm=wn, name="net"
      )(batch["hmc"])
    return ImageNet(self.image_channels, self.features, wn, name="net")(batch["image_frontal"])


class _ConditionHead(nn.Module):
  """Base of the modules that read one signal with a ``ConditionNet`` (named 'net') and map its
  features to the latent space with a dense head: the ``ConditionNet`` attributes plus ``z_dim``."""

  condition: str
  z_dim: int
  features: int = 128
  keypoint_image_size: Optional[Tuple[int, int]] = None
  keypoint_hidden: Sequence[int] = (256, 256)
  hmc_channels: Sequence[int] = (16, 32, 64)
  hmc_features: int = 64
  image_channels: Sequence[int] = (16, 32, 64, 64)
  weight_norm: bool = False

  def __post_init__(self):
    super().__post_init__()
    check_condition(self.condition)
    if self.z_dim <= 0:
      raise ValueError(f"z_dim must be positive, got {self.z_dim}.")

  def condition_net(self) -> ConditionNet:
    """A new ``ConditionNet`` with this module's attributes (call it inside the compact
    ``__call__``)."""
    return ConditionNet(
      self.condition,
      features=self.features,
      keypoint_image_size=self.keypoint_image_size,
      keypoint_hidden=self.keypoint_hidden,
      hmc_channels=self.hmc_channels,
      hmc_features=self.hmc_features,
      image_channels=self.image_channels,
      weight_norm=self.weight_norm,
      name="net",
    )


class ConditionEncoder(_ConditionHead):
  """Inference-time encoder E_c: c -> p(y|c) = N(mu_c, diag exp(logstd_c)^2) and the context h.

  h = ConditionNet(c); [mu_c, raw] = dense_2Z(h) (small init, so p(y|c) starts near N(0, I));
  logstd_c = max_logstd * tanh(raw / max_logstd) keeps the prior's scale in (e^-max, e^max).

  Attributes: as ``ConditionNet`` plus ``z_dim`` and ``max_logstd``.
  """

  max_logstd: float = 5.0

  @nn.compact
  def __call__(self, batch):
    """batch dict -> (mu_c [B, Z], logstd_c [B, Z], h [B, H])."""
    h = self.condition_net()(batch)
    out = nn.Dense(2 * self.z_dim, kernel_init=_small_init, name="head")(h)
    mu, raw = jnp.split(out, 2, axis=-1)
    return mu, layers.soft_clip(raw, self.max_logstd), h


class Regressor(_ConditionHead):
  """DAM-Regressor baseline: c -> z_hat [B, Z] (ConditionNet + dense), trained by MSE to a frozen
  mu_x.

  Attributes: as ``ConditionNet`` plus ``z_dim``.
  """

  @nn.compact
  def __call__(self, batch):
    """batch dict -> [B, Z]."""
    return nn.Dense(self.z_dim, name="head")(self.condition_net()(batch))


class DirectEncoder(_ConditionHead):
  """Direct-encoder baseline's encoder: c -> q(z|c), same output scaling as DAM (0.1 mean, 0.01
  log-std).

  Attributes: as ``ConditionNet`` plus ``z_dim``.
  """

  @nn.compact
  def __call__(self, batch):
    """batch dict -> (mu [B, Z], logstd [B, Z])."""
    h = self.condition_net()(batch)
    out = layers.dense(2 * self.z_dim, self.weight_norm, name="head")(h)
    mu, logstd = jnp.split(out, 2, axis=-1)
    return 0.1 * mu, 0.01 * logstd
