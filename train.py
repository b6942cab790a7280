"""Trains and evaluates a ResNet: a thin launcher over resnet.train.

  python train.py --config=configs/cifar10.py:resnet56 --workdir=runs/r56 \
      --config.batch_size=256

The text after the colon picks the config's variant; `--config.<field>`
overrides any field, and a misspelt field is an error. Metrics, TensorBoard
events and checkpoints go to --workdir; rerunning the same command resumes
from the newest checkpoint there. `make train` runs configs/default.py.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from resnet import host_devices

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for metrics, checkpoints and config.json.')
config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with :variant.',
    lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])
# Multi-host: all three on every process, or none (a single process, or a
# Cloud TPU, SLURM or Open MPI job whose environment says who is who).
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, e.g. 10.0.0.1:1234.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes in the job.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Index of this process, 0 to num_processes - 1.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  # On a CPU host, one pmap device per core, which trains faster there
  # (resnet/host_devices.py; RESNET_HOST_DEVICES=1 keeps one device). Set
  # before anything starts JAX's backends.
  host_devices.configure(host_devices.default_count(
      [config.batch_size, config.eval_batch_size]))
  # Imported once the flags parsed, so that a misspelt flag fails at once.
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from resnet import distributed
  from resnet import train
  # pylint: enable=g-import-not-at-top
  # tf.data only feeds the input pipeline; keep TensorFlow off the
  # accelerators so that JAX has all of their memory.
  tf.config.set_visible_devices([], 'GPU')
  # Join the other hosts before anything touches a device.
  distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)

  logging.info('JAX process %d of %d; %d local devices of %d: %s',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.local_devices())
  # From here on SIGTERM means "save and stop" (resnet/distributed.py).
  with distributed.catch_sigterm():
    try:
      train.train_and_evaluate(config, _WORKDIR.value)
    except distributed.Preempted as preempted:
      logging.warning('%s', preempted)
      sys.exit(distributed.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  app.run(main)
