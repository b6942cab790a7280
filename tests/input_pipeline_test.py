"""Tests of the input pipeline: batches, exact evaluation, shards, resumption.

The digits data set is prepared once into a temporary data_dir; cifar10 and
imagenet2012 run under tfds.testing.mock_data.
"""

import collections
import hashlib

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from resnet import digits
from resnet import input_pipeline


def make_config(data_dir, **overrides):
  config = ml_collections.ConfigDict({
      'dataset': 'digits', 'data_dir': str(data_dir), 'train_split': '',
      'eval_split': '', 'validation_holdout': 0, 'recipe': '',
      'image_size': 0, 'normalization': '', 'scale_augmentation': False,
      'cache': True, 'shuffle_buffer_size': 512, 'batch_size': 32,
      'eval_batch_size': 0, 'seed': 0})
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  input_pipeline.get_dataset_info(make_config(path))  # Prepares digits.
  return path


def read_raw(data_dir, split):
  """uint8 images and labels of a digits split, straight from TFDS."""
  ds = tfds.load('digits', split=split, data_dir=str(data_dir),
                 batch_size=-1)
  return tfds.as_numpy(ds['image']), tfds.as_numpy(ds['label'])


def fingerprint(image, label):
  return hashlib.sha1(image.astype(np.uint8).tobytes()
                      + bytes([int(label)])).hexdigest()


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_digits_builder_has_a_fixed_stratified_split(data_dir):
  train_images, train_labels = read_raw(data_dir, 'train')
  test_images, test_labels = read_raw(data_dir, 'test')
  assert train_images.shape == (1437, 32, 32, 3)
  assert test_images.shape == (360, 32, 32, 3)
  assert train_images.dtype == np.uint8
  assert train_images.min() == 0 and train_images.max() == 255
  assert np.all(train_images[..., 0] == train_images[..., 2])  # Grey.
  np.testing.assert_array_equal(np.bincount(test_labels), [36] * 10)

  # Train and test partition sklearn's 1,797 examples, test as documented.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  source = datasets.load_digits()
  expected = [fingerprint(image, label) for image, label in
              zip(digits.upscale(source.images), source.target)]
  test_expected = [expected[i] for i in digits.test_indices(source.target)]
  test_seen = [fingerprint(*ex) for ex in zip(test_images, test_labels)]
  train_seen = [fingerprint(*ex) for ex in zip(train_images, train_labels)]
  assert sorted(test_seen) == sorted(test_expected)
  assert sorted(test_seen + train_seen) == sorted(expected)


def test_digits_batches_have_the_served_shapes_and_ranges(data_dir):
  config = make_config(data_dir)
  info = input_pipeline.get_dataset_info(config)
  assert (info.num_classes, info.num_train_examples,
          info.num_eval_examples) == (10, 1437, 360)
  assert info.image_shape == (32, 32, 3)
  assert (info.recipe, info.normalization) == ('digits', 'per_pixel_mean')

  batch = next(input_pipeline.create_train_iterator(config))
  # The mean image is computed once and kept next to the data set.
  assert (data_dir / 'digits' / '1.0.0' / 'image_stats_train.npz').exists()
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (4, 8, 32, 32, 3)
  assert batch['image'].dtype == np.float32
  assert batch['label'].shape == (4, 8) and batch['label'].dtype == np.int32
  # Pixels in [0, 1] less a mean in [0, 1]; the 2-pixel shift pads zeros.
  assert -1 <= batch['image'].min() < 0 < batch['image'].max() <= 1
  assert 0 <= batch['label'].min() and batch['label'].max() <= 9

  eval_batch = next(iter(input_pipeline.create_eval_iterator(config)))
  assert eval_batch['mask'].shape == (4, 8)
  assert eval_batch['mask'].dtype == np.float32


@pytest.mark.parametrize('process_count,holdout', [(1, 0), (2, 0), (2, 101)])
def test_eval_sees_every_example_exactly_once(data_dir, process_count,
                                              holdout):
  # 360 (or 101) eval examples do not fill the batches of 32 examples.
  config = make_config(data_dir, validation_holdout=holdout)
  info = input_pipeline.get_dataset_info(config)
  train_images, _ = read_raw(data_dir, info.train_split)
  mean_image = train_images.astype(np.float64).mean(axis=0) / 255
  expected_images, expected_labels = read_raw(data_dir, info.eval_split)
  expected = [fingerprint(*ex) for ex in zip(expected_images,
                                             expected_labels)]

  seen, mask_total, steps = [], 0.0, set()
  for process_index in range(process_count):
    batches = list(input_pipeline.create_eval_iterator(
        config, process_index=process_index, process_count=process_count))
    steps.add(len(batches))
    for batch in batches:
      mask = batch['mask'].reshape(-1)
      assert set(np.unique(mask)) <= {0.0, 1.0}
      mask_total += mask.sum()
      images = batch['image'].reshape(-1, 32, 32, 3)[mask == 1]
      labels = batch['label'].reshape(-1)[mask == 1]
      # Undo the per-pixel mean subtraction to recover the stored pixels.
      pixels = (images + mean_image) * 255
      np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-2)
      seen += [fingerprint(np.round(p), l) for p, l in zip(pixels, labels)]

  assert steps == {input_pipeline.num_eval_steps(
      config, process_count=process_count)}
  assert mask_total == len(expected) == info.num_eval_examples
  assert collections.Counter(seen) == collections.Counter(expected)


def test_train_shards_are_disjoint_and_cover_the_split(data_dir):
  # 1,400 train examples: 700 per process, an epoch of 35 local batches.
  config = make_config(data_dir, validation_holdout=37, batch_size=40)
  shard_ids, label_counts = [], []
  for process_index in range(2):
    setup = input_pipeline._setup(config, process_index, 2, 4, train=True)
    ds = tfds.load('digits', split=setup.shard, data_dir=str(data_dir),
                   read_config=tfds.ReadConfig(add_tfds_id=True))
    shard_ids.append({ex['tfds_id'] for ex in tfds.as_numpy(ds)})
    iterator = input_pipeline.create_train_iterator(
        config, process_index=process_index, process_count=2)
    labels = np.concatenate([b['label'].ravel() for b in take(iterator, 35)])
    label_counts.append(np.bincount(labels, minlength=10))
    # One epoch of the stream is one pass over the shard.
    _, shard_labels = read_raw(data_dir, setup.shard)
    np.testing.assert_array_equal(label_counts[-1],
                                  np.bincount(shard_labels, minlength=10))

  assert len(shard_ids[0]) == len(shard_ids[1]) == 700
  assert not shard_ids[0] & shard_ids[1]
  _, train_labels = read_raw(data_dir, 'train[:-37]')
  np.testing.assert_array_equal(label_counts[0] + label_counts[1],
                                np.bincount(train_labels, minlength=10))


def test_same_seed_same_batches_and_resume_matches(data_dir):
  # 1,437 examples in batches of 32: step 44 straddles epochs 0 and 1,
  # step 45 starts 3 examples into epoch 1.
  config = make_config(data_dir)
  reference = take(input_pipeline.create_train_iterator(config), 47)
  again = take(input_pipeline.create_train_iterator(config), 3)
  for a, b in zip(reference, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])

  config.seed = 1
  other = next(input_pipeline.create_train_iterator(config))
  assert not np.array_equal(other['label'], reference[0]['label'])
  assert not np.array_equal(other['image'], reference[0]['image'])

  config.seed, config.cache = 0, False  # Decoding later changes nothing.
  for start_step in (3, 44, 45):
    resumed = take(input_pipeline.create_train_iterator(
        config, start_step=start_step), 2)
    for a, b in zip(reference[start_step:], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])


def test_eval_iterable_gives_a_fresh_pass_each_time(data_dir):
  evaluation = input_pipeline.create_eval_iterator(make_config(data_dir))
  first, second = list(evaluation), list(evaluation)
  assert len(first) == len(second) == len(evaluation) == 12
  np.testing.assert_array_equal(first[-1]['image'], second[-1]['image'])


@pytest.mark.parametrize('normalization', ['per_pixel_mean', 'per_channel'])
def test_cifar10_mock_batches(tmp_path, normalization):
  config = make_config(tmp_path, dataset='cifar10', batch_size=16,
                       normalization=normalization)
  with tfds.testing.mock_data(num_examples=40):
    info = input_pipeline.get_dataset_info(config)
    train = next(input_pipeline.create_train_iterator(config))
    evaluation = list(input_pipeline.create_eval_iterator(config))
  assert (info.num_classes, info.recipe) == (10, 'cifar')
  assert (info.train_split, info.eval_split) == ('train', 'test')
  assert train['image'].shape == (4, 4, 32, 32, 3)
  assert train['image'].dtype == np.float32
  assert len(evaluation) == 3  # 40 examples in batches of 16.
  mask = np.concatenate([b['mask'].ravel() for b in evaluation])
  assert mask.sum() == 40 and not mask[40:].any()
  images = np.concatenate([b['image'].reshape(-1, 32, 32, 3)
                           for b in evaluation])[:40]
  # Statistics come from the (mock) train split, the same 40 examples.
  np.testing.assert_allclose(images.mean(axis=0 if normalization ==
                                         'per_pixel_mean' else None), 0,
                             atol=1e-5)
  if normalization == 'per_channel':
    np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1, atol=1e-3)


@pytest.mark.parametrize('scale_augmentation', [False, True])
def test_imagenet2012_mock_batches(tmp_path, scale_augmentation):
  config = make_config(tmp_path, dataset='imagenet2012', batch_size=8,
                       image_size=64, scale_augmentation=scale_augmentation)
  with tfds.testing.mock_data(num_examples=10):
    info = input_pipeline.get_dataset_info(config)
    train = next(input_pipeline.create_train_iterator(config))
    evaluation = list(input_pipeline.create_eval_iterator(config))
  assert (info.num_classes, info.recipe) == (1000, 'imagenet')
  assert info.eval_split == 'validation'
  assert info.image_shape == (64, 64, 3)
  assert train['image'].shape == (4, 2, 64, 64, 3)
  assert train['label'].dtype == np.int32
  # Per-channel ImageNet statistics map [0, 255] into about [-2.2, 2.7].
  for batch in [train] + evaluation:
    assert -2.2 <= batch['image'].min() and batch['image'].max() <= 2.7
  assert len(evaluation) == 2
  assert sum(b['mask'].sum() for b in evaluation) == 10


def test_imagenet_recipe_decodes_png_too(tmp_path):
  # CIFAR's images are PNG, so the crop cannot be fused with decoding.
  config = make_config(tmp_path, dataset='cifar10', recipe='imagenet',
                       image_size=48, batch_size=8)
  with tfds.testing.mock_data(num_examples=8):
    train = next(input_pipeline.create_train_iterator(config))
    evaluation = next(iter(input_pipeline.create_eval_iterator(config)))
  assert train['image'].shape == evaluation['image'].shape == (4, 2, 48, 48,
                                                               3)
  assert np.isfinite(train['image']).all()


@pytest.mark.parametrize('dataset,recipe,image_shape', [
    ('cifar100', 'cifar', (32, 32, 3)),
    ('mnist', 'cifar', (28, 28, 1)),
    ('imagenette', 'imagenet', (224, 224, 3)),
    ('oxford_flowers102', 'imagenet', (224, 224, 3))])
def test_recipe_is_chosen_by_dataset(tmp_path, dataset, recipe, image_shape):
  with tfds.testing.mock_data(num_examples=2):
    info = input_pipeline.get_dataset_info(make_config(tmp_path,
                                                       dataset=dataset))
  assert (info.recipe, info.image_shape) == (recipe, image_shape)


def test_prefetch_to_device_shards_batches_ahead():
  pulled = []

  def batches():
    for step in range(5):
      pulled.append(step)
      yield {'x': np.full((jax.local_device_count(), 2), step, np.float32)}

  prefetched = input_pipeline.prefetch_to_device(batches(), 2)
  first = next(prefetched)
  assert len(pulled) == 2
  assert isinstance(first['x'], jax.Array)
  assert len(first['x'].sharding.device_set) == jax.local_device_count()
  rest = list(prefetched)
  np.testing.assert_array_equal([b['x'][0, 0] for b in rest], [1, 2, 3, 4])


def test_bad_batch_size_names_the_numbers(data_dir):
  config = make_config(data_dir, batch_size=30)
  with pytest.raises(ValueError, match=r'batch_size=30 .* 2 \* 4 = 8'):
    input_pipeline.create_train_iterator(config, process_count=2,
                                         process_index=1)


@pytest.mark.parametrize('field,value,accepted', [
    ('recipe', 'mnist', 'cifar'),
    ('normalization', 'zca', 'per_channel'),
    ('image_size', 28, 'accepted: 0 or 32'),
    ('dataset', 'cifar11', 'cifar10'),
    ('eval_split', 'test', 'set one')])
def test_bad_config_values_raise(data_dir, field, value, accepted):
  config = make_config(data_dir, **{field: value})
  if field == 'eval_split':
    config.validation_holdout = 100
  with pytest.raises(ValueError, match=accepted):
    input_pipeline.get_dataset_info(config)


@pytest.mark.parametrize('dataset,advice', [
    ('cifar10', 'tfds build cifar10'),
    ('imagenet2012', 'downloads/manual')])
def test_missing_dataset_says_where_and_how(tmp_path, dataset, advice):
  config = make_config(tmp_path, dataset=dataset)
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.get_dataset_info(config)
  assert str(tmp_path) in str(error.value) and advice in str(error.value)
