"""Per-example recipes of the paper: decoding, augmentation, normalisation.

Also computes the train-split statistics that normalisation subtracts.
Every random choice draws from a stateless seed passed in with the example,
so a given (seed, example position) always gives the same image.
"""

import io
from typing import Callable, Optional
import uuid

import numpy as np
import tensorflow as tf

# Per-channel RGB statistics of ImageNet's training images, in [0, 1] units.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# The eval crop keeps 224/256 of the shorter side (resize to 256, crop 224).
_CENTER_CROP_FRACTION = 224 / 256


def decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
  """uint8 [H, W, channels] from PNG, JPEG, GIF or BMP bytes."""
  image = tf.io.decode_image(encoded, channels=channels,
                             expand_animations=False)
  return tf.ensure_shape(image, [None, None, channels])


def _decode_and_crop(encoded: tf.Tensor, window_fn) -> tf.Tensor:
  """Decodes only the window [y, x, h, w] that `window_fn(shape)` picks.

  JPEG decoding is fused with the crop (the ImageNet case, where most of a
  large image is thrown away); other formats are decoded whole and sliced.
  """
  def jpeg():
    window = window_fn(tf.image.extract_jpeg_shape(encoded))
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

  def other():
    image = decode(encoded, 3)
    y, x, h, w = tf.unstack(window_fn(tf.shape(image)))
    return image[y:y + h, x:x + w]

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def _center_window(shape) -> tf.Tensor:
  side = tf.cast(tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)
                 * _CENTER_CROP_FRACTION, tf.int32)
  return tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side,
                   side])


def _inception_window(shape, seed) -> tf.Tensor:
  """Random crop of 8-100 % of the area, aspect ratio in [3/4, 4/3]."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  # After 10 failed attempts the whole image comes back: crop the centre.
  failed = tf.reduce_all(tf.equal(size[:2], shape[:2]))
  return tf.cond(failed, lambda: _center_window(shape), lambda: window)


def _scale_window(shape, seed, size) -> tf.Tensor:
  """The paper's scale augmentation, expressed in source pixels.

  Resizing the shorter side to s in [256, 480] and cropping size x size is
  the same as cropping a square of side size * shorter / s here and
  resizing it to size x size, which lets the crop fuse with decoding.
  """
  seeds = tf.random.split(seed, 3)
  low, high = round(256 * size / 224), round(480 * size / 224)
  scale = tf.random.stateless_uniform([], seeds[0], low, high + 1, tf.int32)
  shorter = tf.minimum(shape[0], shape[1])
  side = tf.minimum(shorter, shorter * size // scale)
  y = tf.random.stateless_uniform([], seeds[1], 0, shape[0] - side + 1,
                                  tf.int32)
  x = tf.random.stateless_uniform([], seeds[2], 0, shape[1] - side + 1,
                                  tf.int32)
  return tf.stack([y, x, side, side])


def make_preprocess(recipe: str, size: int, normalization: str,
                    channels: int, stats: dict | None, *, train: bool,
                    scale_augmentation: bool = False):
  """Returns fn(image, seed [2]) -> float32 [size, size, channels].

  The image comes encoded, or as uint8 for the cifar and digits recipes.

  Args:
    recipe: 'cifar', 'digits' or 'imagenet' (see input_pipeline).
    size: side of the served square image.
    normalization: 'per_pixel_mean' or 'per_channel'; the imagenet recipe
      always uses ImageNet's per-channel mean and std.
    channels: channels of the served image.
    stats: `mean_image`, `channel_mean`, `channel_std` of the train split in
      [0, 1] units (unused by the imagenet recipe).
    train: augment (random crop, flip) rather than serve the plain image.
    scale_augmentation: imagenet only: the paper's shorter side in
      [256, 480] instead of the Inception-style crop.
  """
  if recipe == 'imagenet':
    mean, std = _IMAGENET_MEAN, _IMAGENET_STD
  elif normalization == 'per_pixel_mean':  # The paper: subtract the mean image.
    mean, std = stats['mean_image'], 1.0
  else:
    mean, std = stats['channel_mean'], stats['channel_std']
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)

  def preprocess(image, seed):
    crop_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
    if recipe == 'imagenet':
      if not train:
        window_fn = _center_window
      elif scale_augmentation:
        window_fn = lambda shape: _scale_window(shape, crop_seed, size)
      else:
        window_fn = lambda shape: _inception_window(shape, crop_seed)
      image = _decode_and_crop(image, window_fn)
      image = tf.image.resize(image, [size, size], antialias=True)
    else:
      if image.dtype == tf.string:  # Not decoded when cached.
        image = decode(image, channels)
      image = tf.cast(image, tf.float32)
    image = (image / 255.0 - mean) / std
    if train and recipe != 'imagenet':
      # Zero padding after normalisation pads with the mean (paper: 4 px;
      # digits: 2 px, a small shift).
      pad = 4 if recipe == 'cifar' else 2
      padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
      image = tf.image.stateless_random_crop(
          padded, [size, size, channels], crop_seed)
    if train and recipe != 'digits':  # Digits are not mirror-symmetric.
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return tf.ensure_shape(image, [size, size, channels])

  return preprocess


def image_statistics(read: Callable[[], tf.data.Dataset], channels: int,
                     cache_path: Optional[str]) -> dict[str, np.ndarray]:
  """Mean image and per-channel mean and std, in [0, 1] units.

  `read()` gives the (encoded image, label) records of the train split. The
  result is cached at `cache_path` (if given): every process computes the
  same numbers, and the write is an atomic rename.
  """
  if cache_path and tf.io.gfile.exists(cache_path):
    with tf.io.gfile.GFile(cache_path, 'rb') as f:
      return dict(np.load(io.BytesIO(f.read())))
  ds = read().map(lambda image, _: decode(image, channels),
                  num_parallel_calls=tf.data.AUTOTUNE).batch(512)
  total, total_sq, count = 0.0, 0.0, 0
  for images in ds.as_numpy_iterator():
    images = images.astype(np.float64) / 255.0
    total = total + images.sum(axis=0)
    total_sq = total_sq + np.square(images).sum(axis=(0, 1, 2))
    count += images.shape[0]
  mean_image = total / count
  channel_mean = mean_image.mean(axis=(0, 1))
  pixels = count * mean_image.shape[0] * mean_image.shape[1]
  channel_var = total_sq / pixels - np.square(channel_mean)
  stats = {'mean_image': mean_image.astype(np.float32),
           'channel_mean': channel_mean.astype(np.float32),
           'channel_std': np.sqrt(channel_var).astype(np.float32)}
  if cache_path:
    buffer = io.BytesIO()
    np.savez(buffer, **stats)
    temp = f'{cache_path}.tmp-{uuid.uuid4().hex}'
    with tf.io.gfile.GFile(temp, 'wb') as f:
      f.write(buffer.getvalue())
    tf.io.gfile.rename(temp, cache_path, overwrite=True)
  return stats
