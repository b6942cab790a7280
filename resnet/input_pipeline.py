"""Input pipeline: TFDS data sets, the paper's recipes, per-host tf.data.

Each process reads a disjoint, even shard of the train and eval splits
(`tfds.even_splits`). Training is an infinite, deterministic stream: epoch `e`
is the shard shuffled with a seed drawn from (seed, process, e), epochs are
chained before batching (so a batch may span two epochs and nothing is
dropped), and every augmentation draws from a stateless seed keyed by the
example's position in the stream. Resuming at step k therefore skips whole
epochs for free and reads, without decoding, the records of the current
epoch up to the resume point. Evaluation pads each shard with masked zeros
to a common number of batches, so every example counts exactly once.

The config fields and their defaults are in `default_input_config()`.
"""

import dataclasses
import difflib
import math
import os
import re
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from flax import jax_utils
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet import digits  # pylint: disable=unused-import  (registers it)
from resnet import preprocessing

# tf.data only feeds host memory; the accelerator belongs to JAX.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF's devices were initialised before this import.
  pass

RECIPES = ('cifar', 'digits', 'imagenet')
NORMALIZATIONS = ('per_pixel_mean', 'per_channel')
# Known data sets whose evaluation split is not `test`.
_EVAL_SPLITS = {'imagenet2012': 'validation', 'imagenette': 'validation'}


def default_input_config() -> ml_collections.ConfigDict:
  """The input fields of a training config, with their defaults."""
  return ml_collections.ConfigDict({
      'dataset': 'digits',  # 'digits' or any TFDS image-classification name.
      'data_dir': '',  # '' = the TFDS default (~/tensorflow_datasets).
      'train_split': '',  # '' = 'train'.
      'eval_split': '',  # '' = 'validation' for ImageNet, else 'test'.
      'validation_holdout': 0,  # > 0: the last N train examples are eval.
      'recipe': '',  # '' = by data set; 'digits' | 'cifar' | 'imagenet'.
      'image_size': 0,  # 0 = stored size (cifar, digits) or 224 (imagenet).
      # '' = per_pixel_mean for cifar and digits, per_channel for imagenet.
      'normalization': '',
      'scale_augmentation': False,  # ImageNet: shorter side in [256, 480].
      # Keep records in memory after the first pass: decoded for cifar and
      # digits, encoded for imagenet (not for its train split: ~140 GB).
      'cache': True,
      'shuffle_buffer_size': 16_384,
      'batch_size': 128,  # Global, over all processes and devices.
      'eval_batch_size': 0,  # 0 = batch_size.
      'seed': 0,
  })


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the training code needs to know about the configured data."""
  name: str
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  image_shape: tuple[int, int, int]  # (H, W, C) of the served images.
  train_split: str
  eval_split: str
  recipe: str
  normalization: str


def _field(config: ml_collections.ConfigDict, name: str) -> Any:
  return config.get(name, default_input_config()[name])


def _builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `config.dataset`; prepares `digits` on first use."""
  name = _field(config, 'dataset')
  try:
    builder = tfds.builder(name, data_dir=_field(config, 'data_dir') or None)
  except tfds.core.registered.DatasetNotFoundError:
    close = difflib.get_close_matches(name, tfds.list_builders(), n=5)
    raise ValueError(
        f'dataset={name!r} is not a TFDS data set; close matches: '
        f'{close or "none"} (all names: tfds.list_builders()).') from None
  features = builder.info.features
  if ('image' not in features or 'label' not in features
      or not isinstance(features['label'], tfds.features.ClassLabel)):
    raise ValueError(
        f'dataset={name!r} has features {list(features.keys())}; accepted '
        'are data sets with an `image` and a class `label` feature.')
  if builder.name == 'digits' and not builder.is_prepared():
    # TODO: on several hosts sharing data_dir, let only process 0 prepare,
    # behind a barrier; digits is a single-host data set, so left for now.
    builder.download_and_prepare()  # Offline: the data ships with sklearn.
  return builder


def _not_prepared_error(builder) -> FileNotFoundError:
  name = builder.name
  data_dir = builder.data_dir_root
  if name == 'imagenet2012':
    how = (f'download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
           f'from https://image-net.org into {data_dir}/downloads/manual/, '
           f'then run `tfds build imagenet2012 --data_dir={data_dir}`')
  else:
    how = (f'run `tfds build {name} --data_dir={data_dir}` (on a machine '
           'with internet access, then copy the folder here)')
  return FileNotFoundError(
      f'dataset={name!r} is not prepared: nothing found in '
      f'{builder.data_dir}. To prepare it, {how}, or set data_dir to the '
      'folder that holds it.')


def _read(builder, split, cache: bool,
          decode_channels: int = 0) -> tuple[tf.data.Dataset, int]:
  """(image, label) records of `split` in a fixed order, and their count.

  Images stay encoded, except that a cached split is decoded first when
  `decode_channels` > 0 (small fixed-size images: CIFAR's 50k take 150 MB),
  so later epochs skip decoding.
  """
  read_config = tfds.ReadConfig(shuffle_seed=0, try_autocache=False)
  try:
    ds = builder.as_dataset(
        split=split, shuffle_files=False, read_config=read_config,
        decoders={'image': tfds.decode.SkipDecoding()})
  except AssertionError as e:  # How TFDS 4.9 reports missing files.
    raise _not_prepared_error(builder) from e
  num_examples = int(ds.cardinality())
  if num_examples < 0:
    num_examples = builder.info.splits[split].num_examples
  ds = ds.map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)))
  if cache and decode_channels:
    ds = ds.map(
        lambda image, label: (
            preprocessing.decode(image, decode_channels), label),
        num_parallel_calls=tf.data.AUTOTUNE)
  return (ds.cache() if cache else ds), num_examples


def _splits(config, builder) -> tuple[str, str]:
  """(train, eval) split strings, with the optional validation holdout."""
  train = _field(config, 'train_split') or 'train'
  evaluation = _field(config, 'eval_split')
  holdout = _field(config, 'validation_holdout')
  if holdout < 0:
    raise ValueError(f'validation_holdout={holdout}; accepted: 0 (off) or '
                     'a positive number of train examples.')
  if holdout and evaluation:
    raise ValueError(
        f'validation_holdout={holdout} takes the eval split from the train '
        f'split, but eval_split={evaluation!r} is also set; set one.')
  if holdout:
    return f'{train}[:-{holdout}]', f'{train}[-{holdout}:]'
  return train, evaluation or _EVAL_SPLITS.get(builder.name, 'test')


def _recipe(config, builder) -> tuple[str, int, str]:
  """(recipe, image_size, normalization), validated against the data."""
  recipe = _field(config, 'recipe')
  if recipe not in ('',) + RECIPES:
    raise ValueError(f'recipe={recipe!r}; accepted: {RECIPES} or \'\' '
                     '(chosen by data set).')
  height, width, _ = builder.info.features['image'].shape
  name = builder.name
  if not recipe:
    if name == 'digits':
      recipe = 'digits'
    elif name.startswith('cifar'):
      recipe = 'cifar'
    elif name in ('imagenet2012', 'imagenette') or height is None:
      recipe = 'imagenet'
    else:  # Small fixed-size images get the CIFAR recipe.
      recipe = 'cifar' if max(height, width) <= 64 else 'imagenet'

  size = _field(config, 'image_size')
  if recipe == 'imagenet':
    size = size or 224
  elif height is None or height != width:
    raise ValueError(f'recipe={recipe!r} needs square images of one size; '
                     f'{name!r} has {height}x{width}; use recipe imagenet.')
  elif size not in (0, height):
    raise ValueError(
        f'image_size={size}; the {recipe} recipe serves {name!r} at its '
        f'stored size, accepted: 0 or {height} (or use recipe imagenet).')
  size = size or height

  norm = _field(config, 'normalization')
  if norm not in ('',) + NORMALIZATIONS:
    raise ValueError(f'normalization={norm!r}; accepted: {NORMALIZATIONS} '
                     'or \'\' (recipe default).')
  if recipe == 'imagenet' and norm == 'per_pixel_mean':
    raise ValueError('normalization=\'per_pixel_mean\' needs images of one '
                     'size; the imagenet recipe accepts \'per_channel\' or '
                     '\'\'.')
  norm = norm or ('per_channel' if recipe == 'imagenet' else 'per_pixel_mean')
  return recipe, size, norm


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Number of classes and examples and the served image shape."""
  builder = _builder(config)
  train_split, eval_split = _splits(config, builder)
  recipe, size, norm = _recipe(config, builder)
  channels = 3 if recipe == 'imagenet' else builder.info.features[
      'image'].shape[-1]
  return DatasetInfo(
      name=builder.name,
      num_classes=builder.info.features['label'].num_classes,
      num_train_examples=_read(builder, train_split, cache=False)[1],
      num_eval_examples=_read(builder, eval_split, cache=False)[1],
      image_shape=(size, size, channels),
      train_split=train_split, eval_split=eval_split, recipe=recipe,
      normalization=norm)


def _image_statistics(builder, split, channels) -> dict[str, np.ndarray]:
  """Statistics of `split`, cached next to the prepared data set."""
  path = os.path.join(builder.data_dir,
                      'image_stats_' + re.sub(r'\W', '_', split) + '.npz')
  # Under tfds.testing.mock_data nothing is prepared and nothing is cached.
  return preprocessing.image_statistics(
      lambda: _read(builder, split, cache=False)[0], channels,
      path if builder.is_prepared() else None)


def _batch_sizes(batch_size, field, process_count, local_device_count):
  """(local, per-device) batch sizes of a global batch size."""
  devices = process_count * local_device_count
  if batch_size <= 0 or batch_size % devices:
    raise ValueError(
        f'{field}={batch_size} must be a positive multiple of process_count '
        f'* local_device_count = {process_count} * {local_device_count} = '
        f'{devices}.')
  return batch_size // process_count, batch_size // devices


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What the train and eval streams of one process share."""
  builder: tfds.core.DatasetBuilder
  split: str  # The whole split, over all processes.
  shard: Any  # This process's even part of it (a TFDS split object).
  preprocess: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
  image_shape: tuple[int, int, int]
  decode_channels: int  # For _read: 0 keeps (ImageNet's) images encoded.
  process_index: int
  process_count: int
  local_device_count: int
  local_batch: int
  per_device_batch: int


def _setup(config, process_index, process_count, local_device_count,
           train) -> _Setup:
  """Validates the config and the process layout for one stream."""
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if local_device_count is None:
    local_device_count = jax.local_device_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index}; accepted: 0 to '
                     f'process_count - 1 = {process_count - 1}.')
  if train:
    field, batch_size = 'batch_size', _field(config, 'batch_size')
  else:
    field = 'eval_batch_size'
    batch_size = (_field(config, 'eval_batch_size')
                  or _field(config, 'batch_size'))
  local_batch, per_device_batch = _batch_sizes(
      batch_size, field, process_count, local_device_count)
  builder = _builder(config)
  train_split, eval_split = _splits(config, builder)
  recipe, size, norm = _recipe(config, builder)
  channels = 3 if recipe == 'imagenet' else builder.info.features[
      'image'].shape[-1]
  stats = None
  if recipe != 'imagenet':  # Statistics of the train split, as in the paper.
    stats = _image_statistics(builder, train_split, channels)
  preprocess = preprocessing.make_preprocess(
      recipe, size, norm, channels, stats, train=train,
      scale_augmentation=_field(config, 'scale_augmentation'))
  split = train_split if train else eval_split
  shard = tfds.even_splits(split, n=process_count)[process_index]
  return _Setup(builder, split, shard, preprocess, (size, size, channels),
                0 if recipe == 'imagenet' else channels, process_index,
                process_count, local_device_count, local_batch,
                per_device_batch)


def _finish(ds, setup: _Setup) -> tf.data.Dataset:
  """Batches, shapes [local_devices, per_device_batch, ...] and prefetches."""
  ds = ds.batch(setup.local_batch, drop_remainder=True)
  devices = (setup.local_device_count, setup.per_device_batch)

  def to_devices(batch):
    return {k: tf.reshape(v, devices + tuple(v.shape[1:]))
            for k, v in batch.items()}

  ds = ds.map(to_devices).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True  # Parallel maps keep the input order.
  return ds.with_options(options)


def create_train_iterator(
    config: ml_collections.ConfigDict, *, start_step: int = 0,
    process_index: Optional[int] = None, process_count: Optional[int] = None,
    local_device_count: Optional[int] = None) -> Iterator[dict[str, Any]]:
  """Infinite iterator of augmented training batches for this process.

  Yields numpy dicts: `image` float32 [local_devices, per_device_batch, H, W,
  C] and `label` int32 [local_devices, per_device_batch]. The stream depends
  only on config.seed and the process layout; starting at `start_step` gives
  what an uninterrupted run gives from that step on.
  """
  setup = _setup(config, process_index, process_count, local_device_count,
                 train=True)
  records, shard_size = _read(setup.builder, setup.shard,
                              _field(config, 'cache'), setup.decode_channels)
  if shard_size == 0:
    raise ValueError(f'{setup.shard} of {setup.builder.name!r} is empty; '
                     'every process needs train examples.')
  key = tf.random.fold_in(
      tf.constant([_field(config, 'seed'), 0], tf.int64), setup.process_index)
  shuffle_key, augment_key = tf.unstack(tf.random.split(key, 2))
  buffer_size = _field(config, 'shuffle_buffer_size')

  def epoch(index):
    seed = tf.random.stateless_uniform(
        [], tf.random.fold_in(shuffle_key, index), 0, 2**31 - 1, tf.int64)
    return records.shuffle(buffer_size, seed=seed,
                           reshuffle_each_iteration=False)

  def preprocess(position, record):
    image, label = record
    seed = tf.random.fold_in(augment_key, position)
    return {'image': setup.preprocess(image, seed), 'label': label}

  start = start_step * setup.local_batch
  start_epoch = start // shard_size
  ds = tf.data.Dataset.counter(start_epoch).flat_map(epoch)
  # Positions count examples from the start of training, so augmentations
  # do not depend on where a run was resumed.
  ds = ds.enumerate(start=start_epoch * shard_size)
  ds = ds.skip(start - start_epoch * shard_size)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  return _finish(ds, setup).as_numpy_iterator()


class _EvalIterable:
  """Re-iterable eval batches: each `iter()` is a fresh pass."""

  def __init__(self, ds: tf.data.Dataset, num_steps: int):
    self._ds = ds
    self._num_steps = num_steps

  def __len__(self) -> int:
    return self._num_steps

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self._ds.as_numpy_iterator()


def num_eval_steps(config: ml_collections.ConfigDict, *,
                   process_count: Optional[int] = None,
                   local_device_count: Optional[int] = None) -> int:
  """Eval batches per process; the same on every process."""
  return _num_eval_steps(_setup(config, 0, process_count, local_device_count,
                                train=False))


def _num_eval_steps(setup: _Setup) -> int:
  num_examples = _read(setup.builder, setup.split, cache=False)[1]
  # even_splits gives the first shards one extra example, if any.
  largest_shard = math.ceil(num_examples / setup.process_count)
  return math.ceil(largest_shard / setup.local_batch)


def create_eval_iterator(
    config: ml_collections.ConfigDict, *,
    process_index: Optional[int] = None, process_count: Optional[int] = None,
    local_device_count: Optional[int] = None) -> Iterable[dict[str, Any]]:
  """Finite, re-iterable eval batches of this process's shard.

  Each batch has `image`, `label` and `mask` (float32, 1 for real examples,
  0 for padding) shaped [local_devices, per_device_batch, ...]; every
  process yields `num_eval_steps(config)` batches, and over all processes
  each example of the eval split has mask 1 exactly once. Build it once and
  iterate it at every evaluation: the cache lives in the returned object.
  """
  setup = _setup(config, process_index, process_count, local_device_count,
                 train=False)
  num_steps = _num_eval_steps(setup)
  records, _ = _read(setup.builder, setup.shard, _field(config, 'cache'),
                     setup.decode_channels)
  no_seed = tf.zeros([2], tf.int64)  # Eval preprocessing is not random.
  ds = records.map(
      lambda image, label: {'image': setup.preprocess(image, no_seed),
                            'label': label, 'mask': tf.constant(1.0)},
      num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros(setup.image_shape, tf.float32),
      'label': tf.constant(0, tf.int32), 'mask': tf.constant(0.0)}).repeat()
  ds = ds.concatenate(padding).take(num_steps * setup.local_batch)
  return _EvalIterable(_finish(ds, setup), num_steps)


def prefetch_to_device(iterator: Iterator[Any], size: int,
                       devices: Optional[Sequence[jax.Device]] = None
                       ) -> Iterator[Any]:
  """Moves batches [local_devices, ...] onto the devices, `size` ahead.

  Each leaf's leading axis is split over `devices` (default: the local
  devices in pmap's order), so the pmapped step needs no further transfer.
  """
  return jax_utils.prefetch_to_device(iterator, size, devices)
