"""Tests for resnet/distributed.py: start-up, collectives and preemption.

The multi-process tests start 2 local processes x 2 simulated CPU devices
that join through a loopback coordinator and gloo, as the hosts of a pod do.
"""

import json
import os
import signal

import pytest

from resnet import distributed
from tests import multiprocess

_WORKER = os.path.join('tests', 'distributed_worker.py')
_CLUSTER_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS',
                 'SLURM_PROCID', 'SLURM_LOCALID', 'OMPI_MCA_orte_hnp_uri',
                 'KUBERNETES_SERVICE_HOST')


def _results(results):
  """The `RESULT {json}` line of each process, in process order."""
  parsed = []
  for r in results:
    lines = [l for l in r.log.splitlines() if l.startswith('RESULT ')]
    assert len(lines) == 1, multiprocess.describe(results)
    parsed.append(json.loads(lines[0][len('RESULT '):]))
  return parsed


class TestInitialize:

  def test_single_process_without_cluster_or_flags(self, monkeypatch):
    for var in _CLUSTER_VARS:
      monkeypatch.delenv(var, raising=False)
    assert distributed.detected_cluster() is None
    assert distributed.initialize() is False

  def test_detects_slurm_from_its_environment(self, monkeypatch):
    for var, value in [('SLURM_JOB_ID', '7'), ('SLURM_STEP_NODELIST', 'n1'),
                       ('SLURM_NTASKS', '2'), ('SLURM_PROCID', '0'),
                       ('SLURM_LOCALID', '0')]:
      monkeypatch.setenv(var, value)
    assert distributed.detected_cluster() == 'slurm'

  @pytest.mark.parametrize('kwargs, match', [
      (dict(coordinator_address='127.0.0.1:1234'), 'num_processes'),
      (dict(num_processes=2, process_id=0), 'coordinator_address'),
      (dict(coordinator_address='127.0.0.1:1', num_processes=2,
            process_id=2), r'process_id=2.*\[0, 2\)'),
      (dict(coordinator_address='127.0.0.1:1', num_processes=0,
            process_id=0), 'num_processes=0'),
      (dict(coordinator_address='localhost', num_processes=2,
            process_id=0), "'host:port'"),
  ])
  def test_rejects_incomplete_or_bad_flags(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      distributed.initialize(**kwargs)


class TestPreemption:

  def test_single_process_stops_at_next_check_step(self):
    previous = signal.getsignal(signal.SIGTERM)
    with distributed.catch_sigterm():
      assert not distributed.should_stop(3, check_every_steps=3)
      os.kill(os.getpid(), signal.SIGTERM)
      assert distributed.sigterm_received()
      # Between check steps the answer stays False without any collective.
      assert not distributed.should_stop(4, check_every_steps=3)
      assert not distributed.should_stop(5, check_every_steps=3)
      assert distributed.should_stop(6, check_every_steps=3)
    assert signal.getsignal(signal.SIGTERM) is previous

  def test_flag_is_cleared_on_entry(self):
    with distributed.catch_sigterm():
      os.kill(os.getpid(), signal.SIGTERM)
    with distributed.catch_sigterm():
      assert not distributed.should_stop(1, check_every_steps=1)


class TestMultiProcess:

  def test_psum_spans_all_devices_of_all_processes(self, tmp_path):
    results = multiprocess.run(
        [_WORKER, '--scenario=psum'], num_processes=2, devices_per_process=2,
        log_dir=str(tmp_path), timeout_s=120)
    assert [r.returncode for r in results] == [0, 0], (
        multiprocess.describe(results))
    for i, result in enumerate(_results(results)):
      assert result['process_index'] == i
      assert result['process_count'] == 2
      assert result['local_device_count'] == 2
      assert result['device_count'] == 4
      # Devices contribute 0, 1 (process 0) and 10, 11 (process 1).
      assert result['psum'] == [22.0, 22.0]

  def test_sigterm_to_one_process_stops_all_at_the_same_step(self, tmp_path):
    results = multiprocess.run(
        [_WORKER, '--scenario=preempt', '--num_steps=40',
         '--check_every_steps=4', '--sigterm_process=1',
         '--sigterm_at_step=5'],
        num_processes=2, devices_per_process=2, log_dir=str(tmp_path),
        timeout_s=120)
    assert [r.returncode for r in results] == [
        distributed.PREEMPTED_EXIT_CODE] * 2, multiprocess.describe(results)
    parsed = _results(results)
    # The signal lands after step 5; step 8 is the next check step.
    assert [p['stopped_at'] for p in parsed] == [8, 8]
    assert [p['signal_received'] for p in parsed] == [False, True]
