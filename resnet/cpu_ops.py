"""Faster XLA:CPU forms of a ResNet's convolutions and max pool.

XLA's CPU backend runs a matrix product two to three times faster than the
same arithmetic written as a 1x1 convolution, in the forward pass and in
both gradients (measured layer by layer on an AVX-512 EPYC, jaxlib 0.10.2:
a bottleneck's 256->64 1x1 conv at 56x56 runs its forward pass at 63 against
184 GFLOP/s, its kernel gradient at 31 against 89). A 1x1 convolution is a
matrix product over the channels, so `conv_general_dilated` writes it as
one (`lax.dot_general` over the strided input) and lets autodiff derive the
gradients, which are matrix products too. Larger kernels keep XLA's own
convolution.

On hosts without AVX-512, XLA:CPU computed the kernel gradient of 3x3
convolutions five times slower than their forward pass (4.7-6 against 24-31
GFLOP per core-second on an AVX2 EPYC), where here the two run at the same
speed; there, the kernel gradient is computed as one matrix product of the
stacked, shifted input windows (im2col) with the output gradient, which
halved a resnet18 step's CPU time on that machine. The stacked windows take
kernel-height x kernel-width times the memory of the layer's input.

XLA:CPU differentiates a max pool through select-and-scatter, which took
228 ms for the resnet18 stem's pool at batch 16, against 11 ms for the
forward pass. `max_pool` selects the maximum among the window's shifted,
strided slices instead, whose gradient is elementwise selects and pads
(69 ms, and 21 ms forward).

XLA:CPU computes each kernel gradient on transposed copies ([C, H, W, N])
of the layer's input and output gradient. Where that input is a block's
output, relu(BN(conv) + shortcut), its fusion pass recomputes the
BatchNorm-add-ReLU chain, up to three blocks deep, inside the transpose
instead of reading the value the forward pass already wrote: 312 of a
780 ms resnet20 step went to these transposes. `materialize` hands such a
value through a conditional, which XLA cannot fuse across, so the value is
written once and read thereafter (the transposes fell to 98 ms; the step
ran 1.2x faster). `lax.optimization_barrier` would say this more plainly,
but XLA:CPU removes barriers before fusion.

RESNET_CPU_OPS picks the strategy (read when a step is traced):

- `auto` (or unset): `dot`, plus `im2col` on hosts without AVX-512;
- `dot`: 1x1 convolutions as matrix products, larger ones XLA's, the
  max pool of shifted slices, and materialised block outputs;
- `im2col`: as `dot`, and the kernel gradient of larger ones by im2col;
- `xla` (or `0`): lax's convolution and flax's max pool everywhere, and
  `materialize` the identity.

On other backends, and for convolutions outside the plain NHWC/HWIO case
(grouped, dilated), they are `lax.conv_general_dilated` and
`flax.linen.max_pool` themselves.
"""

import functools
import os
from collections.abc import Sequence

import jax
from jax import lax
import flax.linen as nn
import jax.numpy as jnp

ENV = 'RESNET_CPU_OPS'
MODES = ('auto', 'dot', 'im2col', 'xla')
_ALIASES = {'': 'auto', '0': 'xla'}
_NHWC = (0, 3, 1, 2)  # (batch, feature, spatial...) positions in NHWC.
_HWIO = (3, 2, 0, 1)  # (out, in, spatial...) positions in HWIO.


@functools.cache
def _has_avx512() -> bool:
  """Whether the host CPU has AVX-512 (Linux; False where unknown)."""
  try:
    with open('/proc/cpuinfo') as f:
      return any(line.startswith('flags') and ' avx512f' in line
                 for line in f)
  except OSError:
    return False


def mode() -> str:
  """The strategy in force: one of 'dot', 'im2col', 'xla'.

  Raises:
    ValueError: for a RESNET_CPU_OPS value outside `MODES` and '0'.
  """
  text = os.environ.get(ENV, '').strip().lower()
  text = _ALIASES.get(text, text)
  if text not in MODES:
    raise ValueError(
        f'{ENV}={os.environ[ENV]!r} is not accepted; accepted: '
        f'{", ".join(MODES)} (or 0 for xla), or unset for auto.')
  if jax.default_backend() != 'cpu':
    return 'xla'
  if text == 'auto':
    return 'dot' if _has_avx512() else 'im2col'
  return text


def enabled() -> bool:
  """Whether the operations here differ from lax's and flax's (CPU only)."""
  return mode() != 'xla'


def _is_plain(lhs, rhs, dimension_numbers, lhs_dilation, rhs_dilation,
              feature_group_count, batch_group_count) -> bool:
  """True for an NHWC x HWIO -> NHWC convolution without groups or
  dilation: the case handled here."""
  numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                       dimension_numbers)
  undilated = all(all(d == 1 for d in dilation or ())
                  for dilation in (lhs_dilation, rhs_dilation))
  return (lhs.ndim == 4 and undilated and feature_group_count == 1
          and batch_group_count == 1 and tuple(numbers.lhs_spec) == _NHWC
          and tuple(numbers.rhs_spec) == _HWIO
          and tuple(numbers.out_spec) == _NHWC)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """`lax.conv_general_dilated`, faster on CPU (see the module docstring).

  Takes the arguments of `lax.conv_general_dilated`, so that it can be
  passed as `flax.linen.Conv(conv_general_dilated=...)`.
  """
  strategy = mode()
  if strategy != 'xla' and _is_plain(
      lhs, rhs, dimension_numbers, lhs_dilation, rhs_dilation,
      feature_group_count, batch_group_count):
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2],
                                    window_strides, padding)
    pads = tuple(tuple(int(p) for p in pair) for pair in padding)
    strides = tuple(window_strides)
    if rhs.shape[:2] == (1, 1) and not any(sum(pads, ())):
      return _pointwise(lhs, rhs, strides, precision, preferred_element_type)
    if strategy == 'im2col':
      return _conv(lhs, rhs, strides, pads, precision, preferred_element_type)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


def max_pool(x: jax.Array, window: tuple[int, int],
             strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """`flax.linen.max_pool` over the two spatial axes of NHWC `x`, padded
  with -inf; on CPU, the maximum of the window's shifted slices.

  As with select-and-scatter, the gradient goes to the first maximum of
  each window, in row-major window order.
  """
  if mode() == 'xla':
    return nn.max_pool(x, window, strides, padding)
  # In float32: XLA:CPU has no fast bfloat16 elementwise arithmetic (the
  # bfloat16 gradient took 100x as long), and the maxima are exact anyway.
  (pad_h, pad_w), (stride_h, stride_w) = padding, strides
  padded = jnp.pad(x.astype(jnp.float32), ((0, 0), pad_h, pad_w, (0, 0)),
                   constant_values=-jnp.inf)
  out_height = (padded.shape[1] - window[0]) // stride_h + 1
  out_width = (padded.shape[2] - window[1]) // stride_w + 1
  shifted = [
      padded[:, i:i + stride_h * (out_height - 1) + 1:stride_h,
             j:j + stride_w * (out_width - 1) + 1:stride_w]
      for i in range(window[0]) for j in range(window[1])]
  # The maxima carry no gradient; each window's first slice equal to its
  # maximum is selected, and the gradient flows to it alone.
  best = lax.stop_gradient(functools.reduce(jnp.maximum, shifted))
  out, found = best, jnp.zeros(best.shape, bool)
  for candidate in shifted:
    first = (candidate == best) & ~found
    out = jnp.where(first, candidate, out)
    found = found | first
  return out.astype(x.dtype)


def materialize(x: jax.Array) -> jax.Array:
  """`x`, written to memory once on CPU rather than recomputed by each of
  its consumers' fusions (see the module docstring); the identity
  elsewhere, where each conditional would copy its predicate to the host.

  Both branches return `x` (the second as x + 0, so that XLA does not
  merge them); the predicate, read from `x`, only keeps XLA from folding
  the conditional away. Gradients pass through unchanged, themselves
  through a conditional.
  """
  if mode() == 'xla' or x.size == 0:
    return x
  keep = jnp.isfinite(x.reshape(-1)[0])
  return lax.cond(keep, lambda v: v, lambda v: v + 0, x)


def _pointwise(lhs, rhs, strides, precision, preferred_element_type):
  """An unpadded 1x1 convolution: the strided input times the kernel."""
  stride_h, stride_w = strides
  if stride_h > 1 or stride_w > 1:
    lhs = lhs[:, ::stride_h, ::stride_w]
  # [N, H, W, C_in] x [C_in, C_out] -> [N, H, W, C_out].
  return lax.dot_general(
      lhs, rhs.reshape(rhs.shape[2:]), (((3,), (0,)), ((), ())),
      precision=precision, preferred_element_type=preferred_element_type)


def _forward(lhs, rhs, strides, pads, precision, preferred_element_type):
  return lax.conv_general_dilated(
      lhs, rhs, strides, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=precision, preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(lhs, rhs, strides, pads, precision, preferred_element_type):
  """XLA's convolution, with the kernel gradient by im2col."""
  return _forward(lhs, rhs, strides, pads, precision, preferred_element_type)


def _conv_fwd(lhs, rhs, strides, pads, precision, preferred_element_type):
  out = _forward(lhs, rhs, strides, pads, precision, preferred_element_type)
  return out, (lhs, rhs)


def _conv_bwd(strides, pads, precision, preferred_element_type, residuals,
              grad):
  lhs, rhs = residuals
  # The input gradient: XLA's own transposed convolution, which is fast.
  _, input_vjp = jax.vjp(
      lambda x: _forward(x, rhs, strides, pads, precision,
                         preferred_element_type), lhs)
  (lhs_grad,) = input_vjp(grad)

  # The kernel gradient: windows [N, H_out, W_out, kh * kw * C_in] (one
  # strided slice of the padded input per kernel offset) times the output
  # gradient [N, H_out, W_out, C_out], summed over batch and positions.
  height, width, in_features, out_features = rhs.shape
  _, out_height, out_width, _ = grad.shape
  padded = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
  (stride_h, stride_w) = strides
  windows = [
      padded[:, i:i + stride_h * (out_height - 1) + 1:stride_h,
             j:j + stride_w * (out_width - 1) + 1:stride_w]
      for i in range(height) for j in range(width)]
  windows = jnp.concatenate(windows, axis=-1)
  rhs_grad = lax.dot_general(
      windows.reshape(-1, height * width * in_features),
      grad.reshape(-1, out_features).astype(windows.dtype),
      (((0,), (0,)), ((), ())), precision=precision,
      preferred_element_type=jnp.float32)
  rhs_grad = rhs_grad.reshape(rhs.shape).astype(rhs.dtype)
  return lhs_grad.astype(lhs.dtype), rhs_grad


_conv.defvjp(_conv_fwd, _conv_bwd)
