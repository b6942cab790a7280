"""The ResNet model zoo of He et al. (2015) as Flax Linen modules.

`create(name, num_classes=...)` builds any network of the paper (ImageNet
family of Table 1, CIFAR family of Section 4.2, and their plain twins);
`summary(model)` gives per-stage shapes, parameters and multiply-adds.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet import cpu_ops

# Layer factories with some arguments bound (see ResNet.__call__).
ModuleDef = Callable[..., nn.Module]

# He et al. (2015, Section 3.4) initialise convs as in their "Delving deep
# into rectifiers"; fan-out is the variant the reference implementation uses.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

SHORTCUTS = ('A', 'B', 'C')
VERSIONS = ('v1', 'v1.5')
DTYPES = ('float32', 'bfloat16', 'float16')

# depth -> (block, blocks per stage), paper Table 1 (200 from He et al. 2016).
IMAGENET_DEPTHS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
    200: ('bottleneck', (3, 24, 36, 3)),
}
# Depth 6n + 2: n basic blocks in each of three stages (Section 4.2).
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)


def _pad_shortcut(x: jax.Array, features: int, strides: int) -> jax.Array:
  """Option A: subsample spatially, then zero-pad the new channels."""
  if strides > 1:
    x = x[:, ::strides, ::strides, :]
  extra = features - x.shape[-1]
  if extra > 0:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
  return x


def _shortcut(block: 'ResidualBlock', x: jax.Array, activated: jax.Array,
              features: int) -> jax.Array:
  """The skip path of `block` for its input `x` (option A, B or C).

  Called inside the block's compact `__call__`, so the projection layers
  made here belong to the block. Pre-activation blocks project the
  BN-ReLU-activated input `activated` with a bare 1x1 conv, as in He et al.
  (2016); post-activation blocks project `x` with a 1x1 conv and BatchNorm.
  """
  changes_shape = block.strides != 1 or x.shape[-1] != features
  if block.shortcut == 'A' or (block.shortcut == 'B' and not changes_shape):
    return _pad_shortcut(x, features, block.strides)
  strides = (block.strides, block.strides)
  if block.preactivation:
    return block.conv(features, (1, 1), strides, name='proj_conv')(activated)
  y = block.conv(features, (1, 1), strides, name='proj_conv')(x)
  return block.norm(name='proj_norm')(y)


class ResidualBlock(nn.Module):
  """The basic block: two 3x3 convs, y = F(x) + shortcut(x).

  `shortcut` None makes the plain block (no skip path). Post-activation
  (He et al. 2015): conv-BN-ReLU, conv-BN, add, ReLU. Pre-activation (He et
  al. 2016): BN-ReLU-conv twice, then the identity addition with no ReLU
  after. `zero_init_residual` zeroes the last BatchNorm scale of F, or for
  pre-activation, which has no BatchNorm after the last conv, that conv's
  kernel; either way F(x) = 0 at initialisation.
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  shortcut: str | None = 'B'
  preactivation: bool = False
  zero_init_residual: bool = False
  version: str = 'v1'  # Only bottlenecks have a choice of stride place.

  expansion: ClassVar[int] = 1

  def branch(self) -> list[tuple[int, tuple[int, int], tuple[int, int]]]:
    """(filters, kernel size, strides) of each conv of F."""
    strided = (self.strides, self.strides)
    return [(self.features, (3, 3), strided), (self.features, (3, 3), (1, 1))]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    convs = self.branch()
    y = activated = x
    for i, (features, kernel, strides) in enumerate(convs, start=1):
      zero_init = self.zero_init_residual and i == len(convs)
      conv = functools.partial(
          self.conv, features, kernel, strides, padding=kernel[0] // 2,
          name=f'conv{i}')
      if self.preactivation:
        y = nn.relu(self.norm(name=f'norm{i}')(y))
        activated = y if i == 1 else activated
        y = conv(**({'kernel_init': nn.initializers.zeros}
                    if zero_init else {}))(y)
      else:
        y = self.norm(name=f'norm{i}', scale_init=nn.initializers.zeros
                      if zero_init else nn.initializers.ones)(conv()(y))
        y = y if i == len(convs) else nn.relu(y)

    if self.shortcut is not None:
      y = y + _shortcut(self, x, activated, convs[-1][0])
    # The next block's kernel gradients read this; on CPU, write it once.
    return cpu_ops.materialize(y if self.preactivation else nn.relu(y))


class BottleneckBlock(ResidualBlock):
  """The bottleneck: 1x1 reduce, 3x3, 1x1 expand by `expansion` = 4.

  A downsampling bottleneck puts its stride on the first 1x1 conv in
  'v1' (the paper) and on the 3x3 conv in 'v1.5' (the common modern
  choice: 6% more multiply-adds for resnet50, and better accuracy).
  Orderings, shortcuts and `zero_init_residual` as in `ResidualBlock`.
  """
  expansion: ClassVar[int] = 4

  def branch(self) -> list[tuple[int, tuple[int, int], tuple[int, int]]]:
    strided, one = (self.strides, self.strides), (1, 1)
    s1, s2 = (strided, one) if self.version == 'v1' else (one, strided)
    return [(self.features, (1, 1), s1), (self.features, (3, 3), s2),
            (self.features * self.expansion, (1, 1), one)]


class Stage(nn.Module):
  """Blocks sharing one resolution; the first one applies `strides`."""
  block: ModuleDef
  num_blocks: int
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_blocks):
      x = self.block(self.features, strides=self.strides if i == 0 else 1,
                     name=f'block{i + 1}')(x)
    return x


class ResNet(nn.Module):
  """A residual (or, with `shortcut` None, plain) network.

  ImageNet stem (`cifar_stem` False): 7x7/2 conv, BN, ReLU, 3x3/2 max pool.
  CIFAR stem: 3x3 conv, BN, ReLU. Stage i has `num_filters * 2**(i-1)`
  filters (times the block's expansion) and halves the resolution from the
  second stage on. The head is a global average pool and a dense layer;
  pre-activation adds the final BN-ReLU (`head_norm`) before the pool. The
  stem is the same in both orderings, so the first block's shortcut carries
  an activated input, as He et al. (2016, appendix) prescribe.

  Convs and BatchNorm compute in `dtype` with float32 parameters and
  float32 batch statistics; the pool and head run in float32 (a negligible
  cost) so that logits are float32 for every `dtype`.
  """
  block_cls: type[ResidualBlock]
  stage_sizes: Sequence[int]
  num_classes: int
  num_filters: int = 64
  cifar_stem: bool = False
  shortcut: str | None = 'B'
  version: str = 'v1'
  preactivation: bool = False
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  axis_name: str | None = None
  axis_index_groups: Any = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    # On XLA:CPU, cpu_ops' 1x1 convolutions and max pool are two to four
    # times faster than XLA's own; elsewhere they are lax's and flax's.
    # Blocks pass their outputs through cpu_ops.materialize likewise.
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=conv_kernel_init,
        conv_general_dilated=cpu_ops.conv_general_dilated)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train,
        momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
        param_dtype=jnp.float32, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups)

    x = jnp.asarray(images, self.dtype)
    if self.cifar_stem:
      x = conv(self.num_filters, (3, 3), padding=1, name='stem_conv')(x)
    else:
      x = conv(self.num_filters, (7, 7), (2, 2), padding=3,
               name='stem_conv')(x)
    x = nn.relu(norm(name='stem_norm')(x))
    if not self.cifar_stem:
      # Symmetric padding as in the paper's Caffe models; -inf pads.
      x = cpu_ops.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))

    block = functools.partial(
        self.block_cls, conv=conv, norm=norm, shortcut=self.shortcut,
        version=self.version, preactivation=self.preactivation,
        zero_init_residual=self.zero_init_residual)
    for i, num_blocks in enumerate(self.stage_sizes):
      x = Stage(block, num_blocks, self.num_filters * 2**i,
                strides=1 if i == 0 else 2, name=f'stage{i + 1}')(x)

    if self.preactivation:
      x = nn.relu(norm(name='head_norm')(x))
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32,
                    param_dtype=jnp.float32, name='head')(x)


def names() -> list[str]:
  """Every model name `create` accepts."""
  depths = list(IMAGENET_DEPTHS) + list(CIFAR_DEPTHS)
  return [f'resnet{d}' for d in depths] + [f'plain{d}' for d in depths]


# Override keyword -> what it accepts, for error messages.
OVERRIDES = {
    'shortcut': f'one of {SHORTCUTS} (not for plain names)',
    'version': f'one of {VERSIONS}',
    'preactivation': 'a bool',
    'zero_init_residual': 'a bool (not for plain names)',
    'num_filters': 'a positive int',
    'stage_sizes': 'a tuple of positive ints, one per stage',
    'dtype': f'one of {DTYPES} or the matching jnp dtype',
    'axis_name': 'a str or None',
    'axis_index_groups': ('None, or equal-sized lists of distinct device '
                          'indices (needs axis_name)'),
    'bn_momentum': 'a float in [0, 1)',
    'bn_epsilon': 'a positive float',
}


def _reject(key: str, value: Any, name: str, why: str = '') -> ValueError:
  return ValueError(
      f'{key}={value!r} is not valid for {name!r}{why}; accepted: '
      f'{OVERRIDES[key]}.')


def _check_overrides(name: str, num_stages: int, plain: bool,
                     overrides: dict[str, Any]) -> dict[str, Any]:
  """Validates `create`'s overrides; returns them with dtype resolved."""
  for key, value in overrides.items():
    if key not in OVERRIDES:
      raise ValueError(
          f'Unknown override {key}={value!r} for {name!r}; accepted '
          f'keywords: {", ".join(OVERRIDES)}.')
  o = dict(overrides)
  is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(
      v, (bool, np.bool_))
  if plain and 'shortcut' in o:
    raise _reject('shortcut', o['shortcut'], name, ' (plain nets have none)')
  if plain and o.get('zero_init_residual'):
    raise _reject('zero_init_residual', True, name,
                  ' (plain nets have no residual branch)')
  if 'shortcut' in o and o['shortcut'] not in SHORTCUTS:
    raise _reject('shortcut', o['shortcut'], name)
  if 'version' in o and o['version'] not in VERSIONS:
    raise _reject('version', o['version'], name)
  for key in ('preactivation', 'zero_init_residual'):
    if key in o and not isinstance(o[key], (bool, np.bool_)):
      raise _reject(key, o[key], name)
  if 'num_filters' in o and not (is_int(o['num_filters'])
                                 and o['num_filters'] > 0):
    raise _reject('num_filters', o['num_filters'], name)
  if 'stage_sizes' in o:
    sizes = o['stage_sizes']
    if (not isinstance(sizes, Sequence) or len(sizes) != num_stages
        or not all(is_int(n) and n > 0 for n in sizes)):
      raise _reject('stage_sizes', sizes, name,
                    f' (it has {num_stages} stages)')
    o['stage_sizes'] = tuple(int(n) for n in sizes)
  if 'dtype' in o:
    try:
      dtype = jnp.dtype(o['dtype'])
    except TypeError:
      dtype = None
    if dtype is None or dtype.name not in DTYPES:
      raise _reject('dtype', o['dtype'], name)
    o['dtype'] = dtype
  if 'axis_name' in o and not isinstance(o['axis_name'], (str, type(None))):
    raise _reject('axis_name', o['axis_name'], name)
  groups = o.get('axis_index_groups')
  if groups is not None:
    try:
      groups = [[int(i) for i in g] for g in groups]
      flat = sum(groups, [])
      valid = (bool(groups) and len({len(g) for g in groups}) == 1
               and len(set(flat)) == len(flat) and min(flat) >= 0)
    except (TypeError, ValueError):
      valid = False
    if not valid or o.get('axis_name') is None:
      raise _reject('axis_index_groups', o['axis_index_groups'], name)
    o['axis_index_groups'] = groups
  momentum = o.get('bn_momentum', 0.9)
  if not (isinstance(momentum, (float, int)) and 0 <= momentum < 1):
    raise _reject('bn_momentum', momentum, name)
  epsilon = o.get('bn_epsilon', 1e-5)
  if not (isinstance(epsilon, (float, int)) and epsilon > 0):
    raise _reject('bn_epsilon', epsilon, name)
  return o


def create(name: str, *, num_classes: int, **overrides: Any) -> ResNet:
  """Builds the network `name` (one of `names()`).

  Args:
    name: 'resnet<depth>' or 'plain<depth>', e.g. 'resnet50', 'plain20'.
    num_classes: outputs of the head.
    **overrides: any of `OVERRIDES`; an override given as None keeps the
      default. Defaults: shortcut 'A' (CIFAR) or 'B' (ImageNet), version
      'v1', preactivation and zero_init_residual False, num_filters 16
      (CIFAR) or 64 (ImageNet), stage_sizes from the depth, dtype float32,
      axis_name and axis_index_groups None, bn_momentum 0.9, bn_epsilon
      1e-5.

  Returns:
    An unbound `ResNet`; call it as `model.apply(variables, images,
    train=...)` on NHWC images to get float32 logits [N, num_classes].

  Raises:
    ValueError: for an unknown name, override keyword or override value.
  """
  if name not in names():
    raise ValueError(
        f'Unknown model name {name!r}; accepted: {", ".join(names())}.')
  if not (isinstance(num_classes, (int, np.integer))
          and not isinstance(num_classes, bool) and num_classes > 0):
    raise ValueError(
        f'num_classes={num_classes!r} is not valid; accepted: a positive int.')
  plain = name.startswith('plain')
  depth = int(name.removeprefix('plain').removeprefix('resnet'))
  overrides = {k: v for k, v in overrides.items() if v is not None
               or k not in OVERRIDES}
  if depth in IMAGENET_DEPTHS:
    kind, stage_sizes = IMAGENET_DEPTHS[depth]
    defaults = dict(num_filters=64, cifar_stem=False, shortcut='B',
                    stage_sizes=stage_sizes)
  else:
    kind = 'basic'
    defaults = dict(num_filters=16, cifar_stem=True, shortcut='A',
                    stage_sizes=((depth - 2) // 6,) * 3)
  overrides = _check_overrides(
      name, len(defaults['stage_sizes']), plain, overrides)
  if plain:
    defaults['shortcut'] = None
  block_cls = BottleneckBlock if kind == 'bottleneck' else ResidualBlock
  return ResNet(block_cls=block_cls, num_classes=int(num_classes),
                **{**defaults, **overrides})


@dataclasses.dataclass(frozen=True)
class SummaryRow:
  """One line of a `ModelSummary`: a stem, a stage or the head."""
  name: str
  output_shape: tuple[int, ...]  # Per image (no batch dimension).
  params: int
  macs: int  # Forward multiply-adds per image (the paper's "FLOPs").


@dataclasses.dataclass(frozen=True)
class ModelSummary:
  """Per-stage output shapes, parameters and multiply-adds of a model."""
  image_shape: tuple[int, ...]
  rows: tuple[SummaryRow, ...]

  @property
  def total_params(self) -> int:
    return sum(row.params for row in self.rows)

  @property
  def total_macs(self) -> int:
    return sum(row.macs for row in self.rows)

  def __str__(self) -> str:
    shape = lambda s: 'x'.join(map(str, s))
    lines = [('part', 'output', 'params', 'multiply-adds')]
    lines += [(r.name, shape(r.output_shape), f'{r.params:,}', f'{r.macs:,}')
              for r in self.rows]
    lines.append(('total', '', f'{self.total_params:,}',
                  f'{self.total_macs:,}'))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    text = [f'{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  '
            f'{d:>{widths[3]}}' for a, b, c, d in lines]
    text.insert(1, '-' * len(text[0]))
    text.append(f'(multiply-adds per {shape(self.image_shape)} image)')
    return '\n'.join(text)


def _macs(module: nn.Module, inputs: jax.Array, outputs: jax.Array) -> int:
  """Multiply-adds of one conv or dense layer, from its shapes."""
  positions = math.prod(outputs.shape[:-1])  # Batch of one image.
  if isinstance(module, nn.Conv):
    per_output = (math.prod(module.kernel_size) * inputs.shape[-1]
                  // module.feature_group_count)
    return positions * per_output * module.features
  if isinstance(module, nn.Dense):
    return positions * inputs.shape[-1] * module.features
  return 0


def summary(model: ResNet,
            image_shape: Sequence[int] = (224, 224, 3)) -> ModelSummary:
  """Counts parameters and multiply-adds of `model` per stem, stage, head.

  Works on shapes only (`jax.eval_shape`), so it is cheap even for
  resnet1202. Parameters are the trainable ones (BatchNorm statistics are
  not counted). Multiply-adds count convs and dense layers, as the paper
  does; BatchNorm, ReLU, pooling and additions are left out.
  """
  row_names = (['stem'] + [f'stage{i + 1}' for i in
                           range(len(model.stage_sizes))] + ['head'])
  macs = dict.fromkeys(row_names, 0)
  shapes = {}

  def record(next_fun, args, kwargs, context):
    outputs = next_fun(*args, **kwargs)
    path = context.module.path
    if context.method_name == '__call__' and path:
      macs[path[0].split('_')[0]] += _macs(context.module, args[0], outputs)
      if path == ('stage1',):
        shapes['stem'] = tuple(args[0].shape[1:])
      if isinstance(context.module, Stage):
        shapes[path[0]] = tuple(outputs.shape[1:])
    return outputs

  # One abstract forward pass gives the variables and the layers' shapes.
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  with nn.intercept_methods(record):
    logits, variables = jax.eval_shape(
        functools.partial(model.init_with_output, train=False),
        jax.random.key(0), images)
  params = dict.fromkeys(row_names, 0)
  for key, tree in variables['params'].items():
    params[key.split('_')[0]] += sum(
        math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
  shapes['head'] = tuple(logits.shape[1:])
  rows = tuple(SummaryRow(n, shapes[n], params[n], macs[n])
               for n in row_names)
  return ModelSummary(tuple(image_shape), rows)
