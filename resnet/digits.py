"""TFDS builder for scikit-learn's bundled handwritten digits (`digits`).

The 1,797 8x8 grey images ship inside scikit-learn, so this data set is
prepared offline and lets the default run use the same TFDS and tf.data path
as CIFAR. Images are served at 32x32x3 uint8 so CIFAR models run unchanged.
"""

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
# The source pixels are integers in 0..16.
_SOURCE_MAX = 16.0
# 36 examples of each digit form the test split (360 of 1,797, about 20 %).
TEST_EXAMPLES_PER_CLASS = 36
# numpy's legacy RandomState stream is frozen across numpy releases, so this
# seed fixes the same split on every installation.
SPLIT_SEED = 0


def _interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of linear interpolation, pixel centres."""
  scale = size_in / size_out
  source = np.clip((np.arange(size_out) + 0.5) * scale - 0.5, 0, size_in - 1)
  lower = np.floor(source).astype(int)
  upper = np.minimum(lower + 1, size_in - 1)
  frac = source - lower
  weights = np.zeros((size_out, size_in))
  weights[np.arange(size_out), lower] += 1 - frac
  weights[np.arange(size_out), upper] += frac
  return weights


def upscale(images: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
  """Maps [N, 8, 8] values in 0..16 to [N, size, size, 3] uint8 in 0..255.

  Bilinear upsampling keeps the strokes smooth (nearest neighbour would give
  4x4 blocks); the grey value is replicated to three channels.
  """
  weights = _interpolation_matrix(images.shape[1], size)
  smooth = np.einsum('oh,nhw,pw->nop', weights, images, weights)
  grey = np.clip(np.round(smooth * (255.0 / _SOURCE_MAX)), 0, 255)
  return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)


def test_indices(labels: np.ndarray) -> np.ndarray:
  """Sorted indices of the fixed test split: 36 random examples per class."""
  rng = np.random.RandomState(SPLIT_SEED)
  chosen = []
  for label in range(int(labels.max()) + 1):
    members = np.flatnonzero(labels == label)
    chosen.append(rng.permutation(members)[:TEST_EXAMPLES_PER_CLASS])
  return np.sort(np.concatenate(chosen))


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits (UCI optdigits test set), 32x32x3, 10 classes.

  Splits: `test` holds 36 examples of each digit (360 in all) picked with
  numpy RandomState(0); `train` holds the other 1,437. TFDS stores each
  split in an order fixed by hashing the example keys.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: 1,437 train / 360 test.'}

  # TFDS 4.9.10 locates a builder's source through `importlib_resources`,
  # which it only requires on Python < 3.9; naming the file here skips that
  # import (needed only to look for a checksums file we do not have).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Handwritten digits bundled with scikit-learn (1,797 8x8 grey '
            'images with values 0..16), upsampled bilinearly to 32x32, '
            'scaled to 0..255 and replicated to 3 channels.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    # Imported here so that merely registering the builder stays cheap.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    labels = digits.target.astype(np.int64)
    images = upscale(digits.images)
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_indices(labels)] = True
    return {
        'train': self._generate_examples(images, labels, ~is_test),
        'test': self._generate_examples(images, labels, is_test),
    }

  def _generate_examples(self, images, labels, selected):
    for index in np.flatnonzero(selected):
      # The key is the index in load_digits(), stable across versions.
      yield int(index), {'image': images[index], 'label': labels[index]}
