"""Multi-host start-up and preemption handling shared by all processes.

A pod job runs this code once per host. `initialize` joins the processes into
one JAX system; `catch_sigterm` and `should_stop` turn a SIGTERM seen by any
process into one step at which every process stops, saves and exits with
`PREEMPTED_EXIT_CODE`.
"""

import contextlib
import signal
import types
from collections.abc import Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

# The exit status of a run that stopped on a preemption notice after saving a
# checkpoint: the job is healthy and should be started again with the same
# command, which resumes from that checkpoint. Distinct from 0 (finished),
# 1 (a Python error) and 128 + n (killed by signal n).
PREEMPTED_EXIT_CODE = 42

# Set by the SIGTERM handler of `catch_sigterm`.
_sigterm_received = False


class Preempted(Exception):
  """Raised once all processes have stopped and saved at `step`."""

  def __init__(self, step: int, checkpoint_dir: str):
    super().__init__(
        f'Preempted at step {step}; checkpoint saved in {checkpoint_dir}. '
        f'Run the same command again to resume (exit status '
        f'{PREEMPTED_EXIT_CODE} means "restart me").')
    self.step = step
    self.checkpoint_dir = checkpoint_dir


def detected_cluster() -> str | None:
  """Names the cluster jax.distributed would bootstrap from, if any.

  Calling `jax.distributed.initialize()` without arguments on a plain machine
  fails (no coordinator address), so we only do so where one of jax's cluster
  detectors (Cloud TPU VM or GKE TPU slice, SLURM, Open MPI, Kubernetes)
  recognises its environment. The opt-in detectors (mpi4py) only say whether
  a package is installed, so they are skipped as jax skips them.
  """
  # NOTE: jax has no public API for this; `ClusterEnv._cluster_types` is the
  # list jax.distributed.initialize itself walks (jax 0.10.2).
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=W0212
    if not env.opt_in_only_method and env.is_env_present():
      return env.name or env.__name__
  return None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins this process to the multi-host job; must run before any JAX call.

  Args:
    coordinator_address: 'host:port' of process 0, which hosts the
      coordination service. Together with the next two arguments it selects
      an explicit launch (e.g. several processes on one machine); all three
      are given or none.
    num_processes: the number of processes in the job.
    process_id: this process's index in [0, num_processes).

  Returns:
    True if jax.distributed was initialised (explicitly or from a detected
    cluster), False for a plain single-process run.
  """
  explicit = {'coordinator_address': coordinator_address or None,
              'num_processes': num_processes, 'process_id': process_id}
  given = [name for name, value in explicit.items() if value is not None]
  if given and len(given) != len(explicit):
    missing = sorted(set(explicit) - set(given))
    raise ValueError(
        f'Got {", ".join(f"{n}={explicit[n]!r}" for n in given)} but not '
        f'{", ".join(missing)}: an explicit multi-process launch needs '
        'coordinator_address, num_processes and process_id together.')
  if given:
    if num_processes < 1:
      raise ValueError(
          f'num_processes={num_processes}; it must be a positive integer.')
    if not 0 <= process_id < num_processes:
      raise ValueError(
          f'process_id={process_id}; it must lie in [0, num_processes) = '
          f'[0, {num_processes}).')
    if ':' not in coordinator_address:
      raise ValueError(
          f'coordinator_address={coordinator_address!r}; expected '
          "'host:port', e.g. '127.0.0.1:12345'.")

  cluster = None if given else detected_cluster()
  if not given and cluster is None:
    logging.info('No multi-host cluster detected and no coordinator given: '
                 'running as a single process.')
    return False

  # Cross-process psum on the CPU backend (our tests, CPU clusters) needs a
  # CPU collectives implementation; gloo runs over TCP with nothing to
  # install. It is jax 0.10.2's default, set here so that the choice does
  # not depend on a release's default; GPU and TPU backends ignore it.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if given:
    logging.info('Initialising jax.distributed: process %d of %d, '
                 'coordinator %s.', process_id, num_processes,
                 coordinator_address)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  else:
    logging.info('Initialising jax.distributed from the %s environment.',
                 cluster)
    jax.distributed.initialize()
  logging.info('Process %d of %d; %d local and %d global devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on at least one of them.

  A collective (all processes must call it at the same point of the
  program); it waits for the devices to finish queued work, so call it
  every few steps, not every step.
  """
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
  return bool(np.any(flags))


@contextlib.contextmanager
def catch_sigterm() -> Iterator[None]:
  """Within the block, SIGTERM sets a flag that `should_stop` reads.

  The handler only sets the flag: it runs between two Python bytecodes of
  the main thread, wherever that is, so it must not save or exit itself.
  Enter it after `initialize`; the previous handler returns on exit.

  NOTE: jax.distributed.initialize installs a C++ SIGTERM notifier of its
  own for `multihost_utils.reached_preemption_sync_point` (which orbax's
  `CheckpointManager.reached_preemption` wraps). That protocol must be
  polled every step, settles on a step only after a background round trip
  through the coordination service (tens of steps later in our CPU tests,
  so a short run may end first) and does nothing for a single process. Our
  handler replaces it (the last handler installed wins), which gives one
  mechanism, tested the same way, for one process and for many.
  """
  global _sigterm_received
  _sigterm_received = False
  previous = signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    yield
  finally:
    # None: the previous handler was not installed from Python.
    signal.signal(signal.SIGTERM,
                  signal.SIG_DFL if previous is None else previous)


def _on_sigterm(signum: int, frame: types.FrameType | None) -> None:
  del signum, frame  # Unused; the flag is all the loop needs.
  global _sigterm_received
  _sigterm_received = True


def sigterm_received() -> bool:
  """Whether this process got SIGTERM inside `catch_sigterm`."""
  return _sigterm_received


def should_stop(step: int, check_every_steps: int) -> bool:
  """True on every process at the same step once any of them got SIGTERM.

  Call it after every step on every process. Only every
  `check_every_steps` steps does it combine the processes' flags (a
  collective that waits for the devices); other steps cost one modulo.
  """
  if step % check_every_steps:
    return False
  stop = any_process(_sigterm_received)
  if stop:
    logging.warning(
        'Preemption notice (SIGTERM) received by %s; all %d processes stop '
        'at step %d.',
        'this process' if _sigterm_received else 'another process',
        jax.process_count(), step)
  return stop
