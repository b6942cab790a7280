"""Metric writing: TensorBoard, the log and `metrics.jsonl`, through clu.

`metrics.jsonl` holds one JSON object per `write_scalars` call, `step` plus
the scalars, and is what sweeps, plots and scripts read.
"""

import json
import time
from collections.abc import Mapping
from typing import Any

from absl import logging
from clu import metric_writers
from etils import epath
import jax
import ml_collections
import numpy as np

from resnet import models


class JsonlWriter(metric_writers.MetricWriter):
  """Appends each `write_scalars` call to a JSON-lines file.

  Only scalars are kept; images, histograms and the like go to TensorBoard
  through the other writers. The file is flushed after every write so a crash
  loses nothing that was reported.
  """

  def __init__(self, path: epath.PathLike):
    # Appending keeps the records of earlier runs in a resumed workdir.
    self._file = epath.Path(path).open('a')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {'step': int(step)}
    for name, value in scalars.items():
      value = np.asarray(value).item()
      record[name] = value
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def write_hparams(self, hparams: Mapping[str, Any]):
    # The config is saved beside the metrics as config.json.
    pass

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def create_writer(workdir: str,
                  is_writer: bool) -> metric_writers.MetricWriter:
  """Writer for TensorBoard, the log and `metrics.jsonl` in `workdir`.

  Only one process (`is_writer`, process 0) reports; the others get a writer
  that drops everything, so a pod run writes each metric once.
  """
  if not is_writer:
    return metric_writers.MultiWriter([])
  # Synchronous, so that metrics.jsonl and the log agree line by line and a
  # crash right after a write loses nothing.
  default = metric_writers.create_default_writer(
      workdir, asynchronous=False)
  jsonl = JsonlWriter(epath.Path(workdir) / 'metrics.jsonl')
  return metric_writers.MultiWriter([default, jsonl])


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `workdir/metrics.jsonl`, in the order written."""
  text = (epath.Path(workdir) / 'metrics.jsonl').read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def log_run(config: ml_collections.ConfigDict, plan, model,
            restored_step: int | None) -> None:
  """The start-of-run log: config, devices, batch, length, model, restore.

  `plan` is the `plan.RunPlan` of the run.
  """
  logging.info('Config:\n%s', config)
  logging.info('Process %d of %d; %d local of %d devices: %s',
               jax.process_index(), jax.process_count(),
               plan.local_device_count, plan.device_count, jax.devices())
  logging.info('Batch: %d global, %d per process, %d per device.',
               config.batch_size, plan.local_batch_size,
               plan.per_device_batch_size)
  logging.info('%d steps per epoch; %d train steps = %.2f epochs.',
               plan.steps_per_epoch, plan.num_train_steps, plan.num_epochs)
  logging.info('Computing in %s; parameters and optimizer state float32.',
               config.half_precision_dtype if config.half_precision
               else 'float32')
  logging.info('Model %s:\n%s', config.model,
               models.summary(model, plan.dataset_info.image_shape))
  if restored_step is None:
    logging.info('No checkpoint found: training from scratch.')
  else:
    logging.info('Restored the checkpoint of step %d.', restored_step)


class LoopTimer:
  """Splits the wall time between two logs into input wait, step, other.

  Dispatch is asynchronous, so time blocked in `next(iterator)` is input
  wait, and the rest of the training time is the devices' step time (plus
  dispatch). Evaluation and checkpoints count as `other` and are left out of
  the speed.
  """

  def __init__(self):
    self.reset()

  def reset(self):
    self.start = time.perf_counter()
    self.input_s = 0.0
    self.other_s = 0.0

  def add(self, part: str, since: float) -> None:
    """Adds the time from `since` until now to `input_s` or `other_s`."""
    setattr(self, part, getattr(self, part) + time.perf_counter() - since)

  def speed(self, num_steps: int, batch_size: int) -> dict[str, float]:
    """Steps/s, examples/s and the input wait share since `reset`."""
    train_s = max(time.perf_counter() - self.start - self.other_s, 1e-9)
    logging.info('%d steps in %.2f s: %.2f s waiting for input, %.2f s in '
                 'steps; %.2f s evaluating and checkpointing.', num_steps,
                 train_s, self.input_s, train_s - self.input_s, self.other_s)
    return {
        'steps_per_sec': num_steps / train_s,
        'examples_per_sec': num_steps * batch_size / train_s,
        'input_wait_fraction': self.input_s / train_s,
    }


def write_done(workdir: str, step: int, wall_time_s: float,
               eval_metrics: Mapping[str, float]) -> None:
  """Writes `workdir/done.json`: the final step, wall time, eval metrics."""
  record = {'step': step, 'wall_time_s': wall_time_s, **eval_metrics}
  path = epath.Path(workdir) / 'done.json'
  tmp = path.with_name('done.json.tmp')
  tmp.write_text(json.dumps(record, indent=2))
  tmp.replace(path)
