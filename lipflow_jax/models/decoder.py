"""The DAM decoder D: (z, view[, camera]) -> (view-dependent UV texture, mesh vertices)."""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lipflow_jax.models import layers

UPSAMPLE_MODES = ("resize", "transpose")


def check_sizes(tex_size: int, start_size: int, channels: Sequence[int]):
  """Raises ValueError unless tex_size = start_size * 2^(len(channels) + 1)."""
  n = layers.num_doublings(tex_size, start_size)
  if n != len(channels) + 1:
    raise ValueError(
      f"Decoder: tex_size {tex_size} = start_size {start_size} * 2^{n} needs {n} upsampling convs, "
      "i.e. "
      f"len(channels) == {n - 1}, got channels={tuple(channels)}."
    )


def decode_vertex_subset(decoder: "Decoder", params, z, vertex_ids):
  """Only the vertices ``vertex_ids`` of ``decoder``: the z code, then just their columns of the
  vertex layer (3 per vertex), through the same Flax layers as ``Decoder.__call__``.

  Args:
    decoder: the ``Decoder`` (its sizes); params: its 'params' collection.
    z: [B, Z] codes; vertex_ids: [P] int32.
  Returns:
    [B, P, 3], equal to ``decoder(z, view)[1][:, vertex_ids]`` (normalised), in O(P) instead of
    O(V) work for the last layer.
  """
  wn = decoder.weight_norm
  zc = layers.dense(decoder.z_features, wn).apply({"params": params["z_code"]}, z)
  zc = layers.leaky_relu(zc)
  cols = (3 * jnp.asarray(vertex_ids, jnp.int32)[:, None] + jnp.arange(3)).reshape(-1)
  verts = layers.dense_columns(params["verts"], zc, cols, wn)
  return verts.reshape(z.shape[0], -1, 3)


class Decoder(nn.Module):
  """DAM decoder.

  z -> z code = LeakyReLU(dense ``z_features``); view -> LeakyReLU(dense ``view_features``);
  texture: [z code, view code] -> dense -> [start_size, start_size, start_channels] -> one 2x
    upsampling conv per entry of ``channels`` (LeakyReLU 0.2) -> a last 2x upsampling conv to 3
    channels (no activation) -> optional per-texel untied bias -> optional per-camera colour gain
    and bias;
  vertices: dense from the z code only -> [V, 3].

  Upsampling: 'resize' = nearest 2x resize + 3x3 conv, computed as a sub-pixel conv at the low
    resolution (``layers.upsample_conv``; about 4x faster than transposed convs on CPU);
  'transpose' = 4x4 stride-2 ``ConvTranspose`` (Multiface). The number of 2x steps is
  ``len(channels) + 1`` and must take ``start_size`` to ``tex_size``.

  Multiface full size: tex_size=1024, num_vertices=7306, z_features=256, view_features=8,
  start_size=4, start_channels=Z, channels=(256, 64, 64, 32, 32, 16, 16), upsample='transpose',
  num_cameras=#cameras, weight_norm=True.

  Attributes:
    tex_size: T, the output texture is [T, T, 3].
    num_vertices: V.
    z_features, view_features: widths of the z and view codes.
    start_size, start_channels: the first feature grid of the texture tower.
    channels: output channels of the upsampling convs before the last one.
    upsample: 'resize' or 'transpose'.
    untied_bias: add a learned [T, T, 3] bias after the last conv.
    num_cameras: > 0 adds a per-camera colour gain (init 1) and bias (init 0) [num_cameras, 3].
    weight_norm: weight-normalise the dense and conv layers.
  """

  tex_size: int
  num_vertices: int
  z_features: int = 128
  view_features: int = 8
  start_size: int = 4
  start_channels: int = 64
  channels: Sequence[int] = (64, 32, 16)
  upsample: str = "resize"
  untied_bias: bool = True
  num_cameras: int = 0
  weight_norm: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.upsample not in UPSAMPLE_MODES:
      raise ValueError(
        f"Unknown upsample mode {self.upsample!r}; expected one of {UPSAMPLE_MODES}."
      )
    check_sizes(self.tex_size, self.start_size, self.channels)
    if self.num_vertices <= 0:
      raise ValueError(f"num_vertices must be positive, got {self.num_vertices}.")
    if self.num_cameras < 0:
      raise ValueError(f"num_cameras must be >= 0, got {self.num_cameras}.")

  def _up(self, x, features, name):
    if self.upsample == "resize":
      up_conv = dict(conv_general_dilated=layers.upsample_conv)
      return layers.conv(features, 3, 1, self.weight_norm, name=name, **up_conv)(x)
    kwargs = dict(kernel_size=(4, 4), strides=(2, 2), padding="SAME")
    if self.weight_norm:
      return layers.WeightNormed(nn.ConvTranspose(features, parent=None, **kwargs), name=name)(x)
    return nn.ConvTranspose(features, name=name, **kwargs)(x)

  @nn.compact
  def __call__(self, z, view, camera_index: Optional[jnp.ndarray] = None):
    """Decodes.

    Args:
      z: [B, Z] float32 latent codes.
      view: [B, 3] unit view directions (head coordinates).
      camera_index: optional [B] int32 dome camera indices for the colour gain/bias (ignored when
        ``num_cameras == 0``; out-of-range indices are clamped).
    Returns:
      tex: [B, T, T, 3] float32 (normalised texture space), verts: [B, V, 3] float32 (normalised).
    """
    wn = self.weight_norm
    b = z.shape[0]
    zc = layers.leaky_relu(layers.dense(self.z_features, wn, name="z_code")(z))
    vc = layers.leaky_relu(layers.dense(self.view_features, wn, name="view_code")(view))

    verts = layers.dense(self.num_vertices * 3, wn, name="verts")(zc).reshape(
      b, self.num_vertices, 3
    )

    s, c0 = self.start_size, self.start_channels
    x = layers.dense(s * s * c0, wn, name="tex_start")(jnp.concatenate([zc, vc], axis=-1))
    x = layers.leaky_relu(x).reshape(b, s, s, c0)
    for i, c in enumerate(self.channels):
      x = layers.leaky_relu(self._up(x, c, f"up_{i}"))
    tex = self._up(x, 3, f"up_{len(self.channels)}")
    if self.untied_bias:
      tex = layers.UntiedBias(name="tex_bias")(tex)

    if self.num_cameras > 0:
      gain = self.param("color_gain", nn.initializers.ones, (self.num_cameras, 3), jnp.float32)
      bias = self.param("color_bias", nn.initializers.zeros, (self.num_cameras, 3), jnp.float32)
      if camera_index is not None:
        idx = jnp.clip(jnp.asarray(camera_index, jnp.int32), 0, self.num_cameras - 1)
        tex = tex * gain[idx][:, None, None, :] + bias[idx][:, None, None, :]
    return tex, verts
