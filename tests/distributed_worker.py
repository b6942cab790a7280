"""One simulated host for distributed_test.py, launched by tests/multiprocess.

Scenarios (--scenario):
  psum     every device contributes `10 * process_id + local device index`;
           prints the pmapped psum over all devices of all processes.
  preempt  runs --num_steps tiny pmapped steps; process --sigterm_process
           sends itself SIGTERM after step --sigterm_at_step; every process
           asks `distributed.should_stop` after each step, and exits with
           PREEMPTED_EXIT_CODE at the agreed step.
Each prints one line `RESULT {json}` for the test to parse.
"""

import json
import os
import signal
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from resnet import distributed

flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Number of processes.')
flags.DEFINE_integer('process_id', None, 'Index of this process.')
flags.DEFINE_enum('scenario', 'psum', ['psum', 'preempt'], 'What to run.')
flags.DEFINE_integer('num_steps', 50, 'Steps in the preempt scenario.')
flags.DEFINE_integer('check_every_steps', 4, 'Steps between agreements.')
flags.DEFINE_integer('sigterm_process', 1, 'Process that gets SIGTERM.')
flags.DEFINE_integer('sigterm_at_step', 5, 'Step after which it gets it.')
FLAGS = flags.FLAGS


def _report(**result) -> None:
  print('RESULT ' + json.dumps(result), flush=True)


def main(argv):
  del argv  # Unused.
  # Before any JAX computation, which would start a single-process backend.
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  local = jnp.arange(jax.local_device_count(), dtype=jnp.float32)
  x = local + 10.0 * jax.process_index()
  if FLAGS.scenario == 'psum':
    total = jax.pmap(lambda v: jax.lax.psum(v, 'batch'), axis_name='batch')(x)
    _report(process_index=jax.process_index(),
            process_count=jax.process_count(),
            local_device_count=jax.local_device_count(),
            device_count=jax.device_count(), psum=total.tolist())
    return

  # A cross-device step keeps the devices as busy as a train step would.
  p_step = jax.pmap(lambda v: v + jax.lax.pmean(v, 'batch') * 1e-3,
                    axis_name='batch')
  with distributed.catch_sigterm():
    for step in range(1, FLAGS.num_steps + 1):
      x = p_step(x)
      if (jax.process_index() == FLAGS.sigterm_process
          and step == FLAGS.sigterm_at_step):
        os.kill(os.getpid(), signal.SIGTERM)
      if distributed.should_stop(step, FLAGS.check_every_steps):
        _report(stopped_at=step,
                signal_received=distributed.sigterm_received())
        sys.exit(distributed.PREEMPTED_EXIT_CODE)
  _report(stopped_at=None, signal_received=distributed.sigterm_received())

if __name__ == '__main__':
  app.run(main)
