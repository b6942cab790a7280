"""Throughput of the train step, the input pipeline and the whole loop.

Each measurement returns a flat dict of figures, which `benchmark.py` prints
as a table or as one JSON object:

- `benchmark_step`: the pmapped train step of `resnet.train` on synthetic
  batches already on the devices. After warm-up, every step is timed to
  completion; the median is the step time. FLOPs per image come from XLA's
  cost analysis of the compiled step (forward, backward and the optimizer
  update), and the achieved FLOP/s is set against a peak, given or measured
  by `measure_peak_flops`.
- `benchmark_input`: the tf.data training stream alone, delivered to the
  host as numpy batches.
- `benchmark_loop`: the training loop's own pieces (stream, prefetch to the
  devices, the step, a device sync every `log_every_steps`), with the share
  of wall time spent waiting for the next batch.
"""

import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from resnet import cpu_ops
from resnet import input_pipeline
from resnet import models
from resnet import optim
from resnet import train

# Steps per epoch assumed for the schedule when the data set is not prepared;
# the schedule changes the learning rate, not the cost of a step.
_FALLBACK_STEPS_PER_EPOCH = 1_000


@dataclasses.dataclass
class StepSetup:
  """A compiled train step with its state, metric sums and figures."""
  compiled: Any  # The AOT-compiled `make_p_train_step` executable.
  model: Any  # The flax module the step trains.
  state: train.TrainState
  sums: dict[str, jax.Array]
  devices: list[jax.Device]
  image_shape: tuple[int, int, int]
  compile_time_s: float
  flops_per_image: float  # 0.0 when the backend gives no cost analysis.


def data_shape(config: ml_collections.ConfigDict,
               image_size: int = 0) -> tuple[int, tuple[int, int, int], int]:
  """(classes, served image shape, train examples) of `config.dataset`.

  Uses the prepared data set when there is one; otherwise TFDS's metadata,
  with `image_size`, `config.image_size`, the stored size or 224, in that
  order, and 0 train examples.
  """
  try:
    info = input_pipeline.get_dataset_info(config)
    shape = info.image_shape
    if image_size:
      shape = (image_size, image_size, shape[2])
    return info.num_classes, shape, info.num_train_examples
  except FileNotFoundError:
    pass
  builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)
  height, _, channels = builder.info.features['image'].shape
  size = image_size or config.image_size or height or 224
  num_classes = builder.info.features['label'].num_classes
  return num_classes, (size, size, channels or 3), 0


def _per_device_batch(config: ml_collections.ConfigDict, num_devices: int):
  if config.batch_size <= 0 or config.batch_size % num_devices:
    raise ValueError(
        f'config.batch_size={config.batch_size} is not divisible by the '
        f'{num_devices} devices benchmarked; accepted: a positive multiple '
        f'of {num_devices}.')
  return config.batch_size // num_devices


def flops_of(compiled) -> float:
  """FLOPs of one run of `compiled` on one device, from XLA; 0.0 if none.

  jax 0.10 returns a dict (older releases a list of one dict per program);
  a pmapped program's figure is that of one device's share.
  """
  try:
    analysis = compiled.cost_analysis()
  except NotImplementedError:
    return 0.0
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float((analysis or {}).get('flops', 0.0))


def setup_step(config: ml_collections.ConfigDict, devices: Sequence[
    jax.Device], batch: dict[str, Any], num_classes: int,
               steps_per_epoch: int) -> StepSetup:
  """Builds and compiles the training library's step for `batch`.

  `batch` is a sharded device batch, as `prefetch_to_device` yields; the
  executable is the one the training loop runs for that layout.
  """
  devices = list(devices)
  image_shape = tuple(batch['image'].shape[2:])
  model = train.create_model(config, num_classes)
  tx = optim.create_optimizer(config)
  num_train_steps = (config.num_train_steps or
                     max(int(config.num_epochs * steps_per_epoch), 1))
  learning_rate_fn = optim.create_learning_rate_fn(
      config, steps_per_epoch, num_train_steps)
  state = train.replicate(
      train.create_train_state(config, model, tx, image_shape), devices)
  sums = train.replicate(train.zero_train_metrics(), devices)
  p_train_step = train.make_p_train_step(
      model, tx, learning_rate_fn, config.label_smoothing, devices)

  started = time.perf_counter()
  compiled = p_train_step.lower(state, sums, batch).compile()
  compile_time_s = time.perf_counter() - started
  per_device_batch = batch['label'].shape[1]
  return StepSetup(compiled, model, state, sums, devices, image_shape,
                   compile_time_s, flops_of(compiled) / per_device_batch)


def synthetic_batch(config: ml_collections.ConfigDict,
                    devices: Sequence[jax.Device],
                    image_shape: Sequence[int], num_classes: int):
  """Random images and labels, sharded onto `devices` as for pmap."""
  per_device = _per_device_batch(config, len(devices))
  rng = np.random.default_rng(config.seed)
  # [devices, per-device batch, H, W, C], as the input pipeline yields.
  host = {
      'image': rng.standard_normal(
          (len(devices), per_device, *image_shape), np.float32),
      'label': rng.integers(
          0, num_classes, (len(devices), per_device), np.int32),
  }
  return next(input_pipeline.prefetch_to_device(iter([host]), 1, devices))


def measure_peak_flops(devices: Sequence[jax.Device], dtype: str = 'float32',
                       size: int = 0, repeats: int = 5) -> float:
  """FLOP/s of chained square matmuls on all of `devices` at once; the best
  of `repeats` runs. Size 1024 on CPU (about 20 ms a matmul on one core),
  8192 elsewhere."""
  devices = list(devices)
  on_cpu = devices[0].platform == 'cpu'
  size = size or (1024 if on_cpu else 8192)
  chain = 8 if on_cpu else 32  # Matmuls per call, to amortise dispatch.

  def matmuls(a, b):
    return lax.fori_loop(0, chain, lambda _, x: x @ b, a)

  # Entries of size**-0.5 keep the chained products' scale near one.
  key = jax.random.PRNGKey(0)
  b = (jax.random.normal(key, (size, size)) * size**-0.5).astype(dtype)
  b = train.replicate(b, devices)
  run = jax.pmap(matmuls, devices=devices)
  jax.block_until_ready(run(b, b))  # Compile and warm up.
  best = float('inf')
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(run(b, b))
    best = min(best, time.perf_counter() - started)
  return 2.0 * size**3 * chain * len(devices) / best


def _time_steps(setup: StepSetup, batch, num_steps: int) -> list[float]:
  """Seconds of each of `num_steps` steps, each run to completion."""
  times = []
  for _ in range(num_steps):
    started = time.perf_counter()
    setup.state, setup.sums = setup.compiled(setup.state, setup.sums, batch)
    jax.block_until_ready((setup.state, setup.sums))
    times.append(time.perf_counter() - started)
  return times


def _check_count(setup: StepSetup, expected: int) -> None:
  """Proves the timed steps ran: the on-device example count adds up."""
  count = int(np.asarray(jax.device_get(setup.sums['count']))[0])
  assert count == expected, f'steps counted {count} examples, not {expected}'


def _flop_figures(flops_per_image: float, images_per_sec: float,
                  peak_flops: float) -> dict[str, float]:
  achieved = flops_per_image * images_per_sec
  return {
      'flops_per_image': flops_per_image,
      'achieved_flops': achieved,
      'peak_flops': peak_flops,
      'fraction_of_peak': achieved / peak_flops if peak_flops else 0.0,
  }


def _describe(config, setup: StepSetup) -> dict[str, Any]:
  return {
      'model': config.model,
      'dtype': train.compute_dtype(config),
      'batch': config.batch_size,
      'image_size': setup.image_shape[0],
      'devices': len(setup.devices),
      'platform': setup.devices[0].platform,
      'cpu_ops': cpu_ops.mode(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }


def benchmark_step(config: ml_collections.ConfigDict, *,
                   devices: Sequence[jax.Device], num_steps: int = 20,
                   warmup_steps: int = 3, image_size: int = 0,
                   peak_flops: float = 0.0) -> dict[str, Any]:
  """Times the pmapped train step on a synthetic batch on `devices`.

  `peak_flops` 0 measures the peak with `measure_peak_flops` in the step's
  compute dtype on the same devices.
  """
  if num_steps < 1 or warmup_steps < 1:
    raise ValueError(
        f'num_steps={num_steps}, warmup_steps={warmup_steps}; accepted: '
        'both 1 or more (the first run after compiling is slower).')
  num_classes, image_shape, num_examples = data_shape(config, image_size)
  steps_per_epoch = (num_examples // config.batch_size
                     or _FALLBACK_STEPS_PER_EPOCH)
  batch = synthetic_batch(config, devices, image_shape, num_classes)
  setup = setup_step(config, devices, batch, num_classes, steps_per_epoch)

  _time_steps(setup, batch, warmup_steps)
  times = _time_steps(setup, batch, num_steps)
  _check_count(setup, (warmup_steps + num_steps) * config.batch_size)
  median = statistics.median(times)
  quartiles = (statistics.quantiles(times, n=4) if len(times) > 1
               else [median] * 3)
  peak_source = 'given'
  if not peak_flops:
    peak_flops = measure_peak_flops(setup.devices, train.compute_dtype(config))
    peak_source = 'measured matmul'
  images_per_sec = config.batch_size / median
  return {
      'mode': 'step', **_describe(config, setup),
      'images_per_sec': images_per_sec,
      'step_time_ms': 1e3 * median,
      'step_time_q1_ms': 1e3 * quartiles[0],
      'step_time_q3_ms': 1e3 * quartiles[2],
      'step_time_min_ms': 1e3 * min(times),
      'step_time_max_ms': 1e3 * max(times),
      'compile_time_s': setup.compile_time_s,
      **_flop_figures(setup.flops_per_image, images_per_sec, peak_flops),
      'peak_source': peak_source,
      # Forward and backward by hand: 2 FLOPs per multiply-add, backward
      # twice the forward; a check on XLA's count, which adds BatchNorm,
      # activations and the optimizer.
      'model_flops_per_image': 6 * models.summary(
          setup.model, image_shape).total_macs,
      'num_steps': num_steps,
  }


def data_context(config: ml_collections.ConfigDict, mock_examples: int):
  """(context, is_mock): TFDS's mock data when the data set is missing.

  Digits are always prepared; another data set that is not prepared runs
  under `tfds.testing.mock_data` with `mock_examples` random examples, a
  smoke figure for the recipe's cost, not one for the real images.
  """
  builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)
  if config.dataset == 'digits' or builder.is_prepared():
    return contextlib.nullcontext(), False
  if mock_examples <= 0:
    raise FileNotFoundError(
        f'dataset={config.dataset!r} is not prepared in {builder.data_dir} '
        'and mock data is off (mock_examples=0).')
  return tfds.testing.mock_data(num_examples=mock_examples), True


def benchmark_input(config: ml_collections.ConfigDict, *,
                    num_batches: int = 50, warmup_batches: int = 5,
                    num_devices: int | None = None) -> dict[str, Any]:
  """Images/s of the training stream as numpy batches on the host.

  The first `warmup_batches` (set-up, statistics, first cache fill) are
  left out; `first_batch_s` reports how long the first one took.
  """
  info = input_pipeline.get_dataset_info(config)
  started = time.perf_counter()
  stream = input_pipeline.create_train_iterator(
      config, local_device_count=num_devices)
  next(stream)
  first_batch_s = time.perf_counter() - started
  for _ in range(warmup_batches - 1):
    next(stream)
  started = time.perf_counter()
  for _ in range(num_batches):
    batch = next(stream)
  elapsed = time.perf_counter() - started
  images = num_batches * batch['label'].size
  return {
      'mode': 'input', 'dataset': info.name, 'recipe': info.recipe,
      'image_size': info.image_shape[0], 'batch': config.batch_size,
      'images_per_sec': images / elapsed,
      'batch_time_ms': 1e3 * elapsed / num_batches,
      'first_batch_s': first_batch_s,
      'num_batches': num_batches,
  }


def benchmark_loop(config: ml_collections.ConfigDict, *,
                   devices: Sequence[jax.Device], num_steps: int = 20,
                   warmup_steps: int = 3,
                   peak_flops: float = 0.0) -> dict[str, Any]:
  """Images/s of stream + prefetch + step, and the input wait's share.

  Runs as `train.train_and_evaluate` does between two logs: no sync but a
  fetch of the metric sums every `config.log_every_steps`, and at the end.
  `peak_flops` 0 reports no fraction of peak (the step mode measures it).
  """
  info = input_pipeline.get_dataset_info(config)
  stream = input_pipeline.prefetch_to_device(
      input_pipeline.create_train_iterator(
          config, local_device_count=len(devices)),
      config.prefetch_size, devices)
  batch = next(stream)
  setup = setup_step(config, devices, batch, info.num_classes,
                     max(info.num_train_examples // config.batch_size, 1))
  _time_steps(setup, batch, 1)
  for _ in range(warmup_steps - 1):
    _time_steps(setup, next(stream), 1)

  input_s = 0.0
  started = time.perf_counter()
  for step in range(1, num_steps + 1):
    waited = time.perf_counter()
    batch = next(stream)
    input_s += time.perf_counter() - waited
    setup.state, setup.sums = setup.compiled(setup.state, setup.sums, batch)
    if step % config.log_every_steps == 0:
      jax.device_get(setup.sums)
  jax.block_until_ready((setup.state, setup.sums))
  wall_s = time.perf_counter() - started
  _check_count(setup, (max(warmup_steps, 1) + num_steps) * config.batch_size)

  images_per_sec = num_steps * config.batch_size / wall_s
  return {
      'mode': 'loop', **_describe(config, setup), 'dataset': info.name,
      'images_per_sec': images_per_sec,
      'step_time_ms': 1e3 * wall_s / num_steps,
      'input_wait_fraction': input_s / wall_s,
      'compile_time_s': setup.compile_time_s,
      **_flop_figures(setup.flops_per_image, images_per_sec, peak_flops),
      'num_steps': num_steps,
  }


def format_table(rows: Sequence[dict[str, Any]],
                 columns: Sequence[str]) -> str:
  """A plain-text table of `columns` of `rows`, one row per result (one
  line per column for a single result); floats to about 3 figures."""
  def cell(value):
    if isinstance(value, float):
      if abs(value) >= 1e5:
        return f'{value:.3e}'
      return f'{value:.0f}' if abs(value) >= 100 else f'{value:.3g}'
    return '' if value is None else str(value)

  if len(rows) == 1:
    width = max(map(len, columns))
    return '\n'.join(f'{c:<{width}}  {cell(rows[0].get(c))}'
                     for c in columns)
  table = [list(columns)] + [[cell(row.get(c)) for c in columns]
                             for row in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
  lines = ['  '.join(text.rjust(width) for text, width in zip(line, widths))
           for line in table]
  lines.insert(1, '-' * len(lines[0]))
  return '\n'.join(lines)
