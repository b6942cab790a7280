"""Multi-host training, preemption and crash safety, with local processes.

Two processes x 2 simulated CPU devices stand for two hosts of a pod; one
process with 4 simulated devices is the reference. Every run is a launch of
tests/train_worker.py (train.py plus test hooks) with the same XLA flags, so
their parameters are comparable, and the runs are shared between the tests
through module-scoped fixtures. All use configs/default.py:tiny: 6 steps,
logs every 2 and checkpoints at steps 3 and 6.

  reference    1 process, fresh, fed the two hosts' batches.
  two_hosts    2 processes, fresh.
  preempted    2 processes, from reference's checkpoint 3, SIGTERM at step 4.
  crashed      2 processes, preempted's restart, SIGKILLed inside the commit
               of checkpoint 6.
  recovered    2 processes, crashed's restart.
  nan_stopped  1 process, from two_hosts' checkpoint 3, a NaN loss at step 5.
  nan_skipped  the same from reference's, with skip_nonfinite_steps.
"""

import json
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from resnet import checkpoint
from resnet import distributed
from tests import multiprocess
from tests import train_worker

_WORKER = os.path.join('tests', 'train_worker.py')
_CONFIG = 'configs/default.py:tiny'
_TIMEOUT_S = 240
_FINAL_STEP = 6


def _steps(workdir: str) -> list[int]:
  """The complete checkpoints in `workdir`, oldest first."""
  return sorted(int(name) for name in os.listdir(
      os.path.join(workdir, checkpoint.CHECKPOINT_DIR)) if name.isdigit())


def _params(workdir: str, step: int):
  """The parameters saved at `step`, restored as numpy."""
  path = os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(step),
                      'default')
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.restore(path)
  return jax.tree.map(np.asarray, tree['params'])


def _assert_params_close(actual, expected):
  # Two and one processes sum the same numbers in another order.
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5),
      actual, expected)


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _copy_until(src: str, dst: str, step: int) -> str:
  """A copy of workdir `src` holding only its checkpoints up to `step`."""
  shutil.copytree(src, dst)
  for later in [s for s in _steps(dst) if s > step]:
    shutil.rmtree(os.path.join(dst, checkpoint.CHECKPOINT_DIR, str(later)))
  for name in ('done.json', 'metrics.jsonl'):
    os.remove(os.path.join(dst, name))
  return dst


def _launch(workdir: str, num_processes: int, *flags: str,
            logs: str = 'logs', start_only: bool = False):
  """Runs (or only starts) the worker; logs go to `<workdir>_<logs>/`."""
  args = [_WORKER, f'--config={_CONFIG}', f'--workdir={workdir}', *flags]
  # NOTE: with XLA's own convolution gradient (RESNET_CPU_OPS=0). With
  # resnet/cpu_ops.py's, 2 processes x 2 devices and 1 x 4 ended 6 steps
  # up to 9e-5 apart (XLA's: 2e-6): rounding, but above the tolerance below.
  kwargs = dict(num_processes=num_processes,
                devices_per_process=4 // num_processes,
                log_dir=f'{workdir}_{logs}', env={'RESNET_CPU_OPS': '0'})
  if start_only:
    return multiprocess.start(args, **kwargs)
  return multiprocess.run(
      args, timeout_s=_TIMEOUT_S,
      clean_exit_codes=(0, distributed.PREEMPTED_EXIT_CODE), **kwargs)


def _assert_exit(results, code: int):
  assert [r.returncode for r in results] == [code] * len(results), (
      multiprocess.describe(results))


def _preempted_step(results) -> int:
  steps = {int(m.group(1)) for r in results
           for m in [re.search(r'Preempted at step (\d+)', r.log)] if m}
  assert len(steps) == 1, multiprocess.describe(results)
  return steps.pop()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  return tmp_path_factory.mktemp('runs')


@pytest.fixture(scope='module')
def reference(runs):
  # Runs first: it also prepares the data set the other runs share.
  workdir = str(runs / 'reference')
  _assert_exit(_launch(workdir, 1, '--test_two_host_stream'), 0)
  return workdir


@pytest.fixture(scope='module')
def two_hosts(runs, reference):
  del reference  # Only for the order: the data set is prepared.
  workdir = str(runs / 'two_hosts')
  _assert_exit(_launch(workdir, 2), 0)
  return workdir


@pytest.fixture(scope='module')
def preempted(runs, reference):
  workdir = _copy_until(reference, str(runs / 'preempted'), 3)
  results = _launch(workdir, 2, '--config.preemption_check_every_steps=1',
                    '--test_sigterm_at_step=4', '--test_sigterm_process=1')
  return workdir, results


@pytest.fixture(scope='module')
def crashed(runs, preempted):
  workdir, _ = preempted
  launch = _launch(workdir, 2, f'--test_hang_in_save_step={_FINAL_STEP}',
                   logs='crashed_logs', start_only=True)
  try:
    launch.wait_for_output(train_worker.HANG_MARKER, _TIMEOUT_S)
    entries = sorted(os.listdir(
        os.path.join(workdir, checkpoint.CHECKPOINT_DIR)))
  finally:
    launch.kill()
  return workdir, entries


@pytest.fixture(scope='module')
def recovered(crashed):
  workdir, _ = crashed
  return workdir, _launch(workdir, 2, logs='recovered_logs')


@pytest.fixture(scope='module')
def nan_stopped(runs, two_hosts):
  workdir = _copy_until(two_hosts, str(runs / 'nan_stopped'), 3)
  return workdir, _launch(workdir, 1, '--test_two_host_stream',
                          '--test_nan_at_step=5')


class TestTwoHosts:

  def test_end_with_the_parameters_of_one_host(self, reference, two_hosts):
    _assert_params_close(_params(two_hosts, _FINAL_STEP),
                         _params(reference, _FINAL_STEP))

  def test_metrics_are_written_once_by_process_zero(self, two_hosts):
    records = _metrics(two_hosts)
    assert [r['step'] for r in records if 'train/loss' in r] == [2, 4, 6]
    assert [r['step'] for r in records if 'eval/loss' in r] == [_FINAL_STEP]
    with open(os.path.join(two_hosts, 'done.json')) as f:
      assert json.load(f)['step'] == _FINAL_STEP

  def test_one_process_restores_their_checkpoint(self, nan_stopped):
    workdir, results = nan_stopped
    assert re.search(r'Restored \S+/3, the newest complete', results[0].log)
    # It trained on from there: step 4 was logged before the NaN of step 5.
    assert [r['step'] for r in _metrics(workdir)] == [4]


class TestPreemption:

  def test_sigterm_saves_and_exits_with_restart_status(self, preempted):
    workdir, results = preempted
    _assert_exit(results, distributed.PREEMPTED_EXIT_CODE)
    # Both processes restored the one-process checkpoint 3, then stopped
    # at the same step, whose checkpoint is the newest.
    for r in results:
      assert re.search(r'Restored \S+/3, the newest complete', r.log)
    step = _preempted_step(results)
    assert 3 < step < _FINAL_STEP
    assert _steps(workdir)[-1] == step

  def test_restart_ends_with_uninterrupted_parameters(self, reference,
                                                      recovered):
    workdir, results = recovered
    _assert_exit(results, 0)
    _assert_params_close(_params(workdir, _FINAL_STEP),
                         _params(reference, _FINAL_STEP))


class TestCrashSafety:

  def test_killed_save_leaves_only_a_temporary_directory(self, crashed):
    _, entries = crashed
    assert f'{_FINAL_STEP}.orbax-checkpoint-tmp' in entries
    assert str(_FINAL_STEP) not in entries

  def test_restart_resumes_from_newest_complete_checkpoint(
      self, preempted, recovered):
    workdir, results = recovered
    _assert_exit(results, 0)
    step = _preempted_step(preempted[1])
    log = results[0].log
    assert re.search(rf'Restored \S+/{step}, the newest complete', log), (
        multiprocess.describe(results))
    # The partial save is reported, then gone.
    assert re.search(r'Removing the incomplete .*orbax-checkpoint-tmp', log)
    assert not [name for name in os.listdir(
        os.path.join(workdir, checkpoint.CHECKPOINT_DIR)) if 'tmp' in name]


class TestNonFiniteLoss:

  def test_stops_naming_steps_and_last_good_checkpoint(self, two_hosts,
                                                       nan_stopped):
    workdir, results = nan_stopped
    _assert_exit(results, 1)
    assert re.search(
        r'FloatingPointError: Training loss is nan in steps 5-6; the last '
        r'good checkpoint, step 3 in \S+/3, is intact', results[0].log), (
            multiprocess.describe(results))
    # Nothing was saved after it, so a restart resumes from it; it restores
    # and holds what the two hosts saved.
    assert _steps(workdir) == [3]
    _assert_params_close(_params(workdir, 3), _params(two_hosts, 3))

  def test_skip_switch_counts_and_continues(self, runs, reference):
    workdir = _copy_until(reference, str(runs / 'nan_skipped'), 3)
    results = _launch(workdir, 1, '--test_two_host_stream',
                      '--test_nan_at_step=5',
                      '--config.skip_nonfinite_steps=True')
    _assert_exit(results, 0)
    train_records = [r for r in _metrics(workdir) if 'train/loss' in r]
    assert [(r['step'], r['train/skipped_steps'])
            for r in train_records] == [(4, 0), (6, 1)]
    assert all(np.isfinite(r['train/loss']) for r in train_records)
