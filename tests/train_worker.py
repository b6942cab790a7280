"""train.py with test-only hooks, for the runs of multihost_test.py.

The hooks make a signal, a crash or a NaN land at a known point of a run
whose steps take milliseconds, and let one process stand in for two:

--test_sigterm_at_step=S (with --test_sigterm_process=P): process P sends
  itself SIGTERM when its input iterator hands out the batch of step S, as a
  preemption notice would arrive in the middle of training.
--test_hang_in_save_step=S: process 0 (the one that commits checkpoints)
  prints HANG_IN_SAVE and sleeps inside orbax's final rename of checkpoint
  S, after every file of it was written to the temporary directory; the
  test then SIGKILLs all processes, as a crash in the middle of a save.
--test_nan_at_step=S: the loss and gradients of step S are NaN, as in a
  diverging run. (NaN images are not enough: the loss can stay finite when
  the ReLUs of a fused XLA CPU kernel turn NaNs into zeros.)
--test_two_host_stream: a single process feeds its devices the batches that
  two processes with half its devices each would read. The input pipeline
  gives each process its own shard of the data, so the global batch depends
  on the process layout; this lets one process reproduce a two-host run.

Everything else is train.py's own `main`, flags included.
"""

import os
import signal
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint._src.path import atomicity

from resnet import input_pipeline
from resnet import train as train_lib
import train

_SIGTERM_AT_STEP = flags.DEFINE_integer(
    'test_sigterm_at_step', 0, 'Step whose batch triggers SIGTERM; 0: off.')
_SIGTERM_PROCESS = flags.DEFINE_integer(
    'test_sigterm_process', 0, 'Process that sends itself SIGTERM.')
_HANG_IN_SAVE_STEP = flags.DEFINE_integer(
    'test_hang_in_save_step', 0, 'Checkpoint step whose commit hangs; 0: off.')
_NAN_AT_STEP = flags.DEFINE_integer(
    'test_nan_at_step', 0, 'Step whose images are NaN; 0: off.')
_TWO_HOST_STREAM = flags.DEFINE_bool(
    'test_two_host_stream', False, 'Read the batches of two processes.')

HANG_MARKER = 'HANG_IN_SAVE'


def _wrap_train_batches(transform) -> None:
  """Passes each (step, batch) of the training stream through `transform`."""
  create = input_pipeline.create_train_iterator

  def create_transformed(config, *, start_step=0, **kwargs):
    batches = create(config, start_step=start_step, **kwargs)
    for step, batch in enumerate(batches, start=start_step + 1):
      yield transform(step, batch)

  input_pipeline.create_train_iterator = create_transformed


def _sigterm_at_step(step: int, process_id: int) -> None:
  def transform(batch_step, batch):
    if batch_step == step and jax.process_index() == process_id:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch
  _wrap_train_batches(transform)


def _nan_at_step(step: int) -> None:
  # Step `step` gets the labels -1, which the loss turns into NaN.
  cross_entropy = train_lib.cross_entropy

  def cross_entropy_nan_for_negative(logits, labels, label_smoothing=0.0):
    loss = cross_entropy(logits, jnp.maximum(labels, 0), label_smoothing)
    # A product, not a select, so that the gradient is NaN as well.
    return loss * jnp.where(labels < 0, jnp.nan, 1.0)

  def transform(batch_step, batch):
    if batch_step == step:
      batch = dict(batch, label=np.full_like(batch['label'], -1))
    return batch

  train_lib.cross_entropy = cross_entropy_nan_for_negative
  _wrap_train_batches(transform)


def _two_host_stream() -> None:
  create = input_pipeline.create_train_iterator

  def create_two_hosts(config, *, start_step=0, **kwargs):
    del kwargs  # This process's layout, replaced by the two hosts'.
    local = jax.local_device_count() // 2
    hosts = [create(config, start_step=start_step, process_index=i,
                    process_count=2, local_device_count=local)
             for i in (0, 1)]
    # Devices 0..local-1 get host 0's shards, the others host 1's, as the
    # global device order of a two-process run has them.
    for batches in zip(*hosts):
      yield {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  input_pipeline.create_train_iterator = create_two_hosts


def _hang_in_save(step: int) -> None:
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  def finalize_or_hang(self, *args, **kwargs):
    if self.get_final().name == str(step):
      print(HANG_MARKER, self.get_final(), flush=True)
      time.sleep(3600)
    return finalize(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_hang


def main(argv):
  # The layout first: the other hooks count the steps of what it yields.
  if _TWO_HOST_STREAM.value:
    _two_host_stream()
  if _SIGTERM_AT_STEP.value:
    _sigterm_at_step(_SIGTERM_AT_STEP.value, _SIGTERM_PROCESS.value)
  if _NAN_AT_STEP.value:
    _nan_at_step(_NAN_AT_STEP.value)
  if _HANG_IN_SAVE_STEP.value:
    _hang_in_save(_HANG_IN_SAVE_STEP.value)
  train.main(argv)


if __name__ == '__main__':
  app.run(main)
