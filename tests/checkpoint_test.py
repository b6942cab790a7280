"""Tests for resnet.checkpoint: what is kept, restored, and refused."""

import json

import numpy as np
import pytest

from configs import default
from resnet import checkpoint


def _state(value):
  # Host numpy arrays, as checkpoint.to_host gives them.
  return {'step': np.asarray(value, np.int32),
          'params': {'w': np.full((2, 3), value, np.float32)}}


def test_keeps_the_latest_and_the_best(tmp_path):
  manager = checkpoint.create_manager(str(tmp_path), checkpoints_to_keep=2)
  accuracies = {1: 0.5, 2: None, 3: 0.9, 4: 0.7, 5: None, 6: 0.6}
  for step, accuracy in accuracies.items():
    metrics = None if accuracy is None else {'eval/accuracy': accuracy}
    assert checkpoint.save(manager, step, _state(step), metrics)
  # Saving a step twice (e.g. at an eval that is also the end) is a no-op.
  assert not checkpoint.save(manager, 6, _state(6))
  manager.wait_until_finished()
  assert manager.all_steps() == [3, 5, 6]
  assert manager.best_step() == 3
  manager.close()

  # A new manager (a restarted run) restores the newest into the structure.
  manager = checkpoint.create_manager(str(tmp_path), checkpoints_to_keep=2)
  restored, step = checkpoint.restore_latest(manager, _state(0))
  assert step == 6 and int(restored['step']) == 6
  np.testing.assert_array_equal(restored['params']['w'], 6.0)
  manager.close()


def test_restore_from_an_empty_directory_gives_the_initial_state(tmp_path):
  manager = checkpoint.create_manager(str(tmp_path), checkpoints_to_keep=2)
  state, step = checkpoint.restore_latest(manager, _state(0))
  assert step is None and int(state['step']) == 0
  manager.close()


def test_config_compatibility(tmp_path):
  config = default.get_config('tiny')
  checkpoint.check_config_compatible(str(tmp_path), config)  # No file yet.
  checkpoint.save_config(str(tmp_path), config)
  assert json.loads((tmp_path / 'config.json').read_text())['model'] == (
      'resnet20')
  # The length, learning rate and logging may change on a restart.
  config.num_train_steps = 100
  config.learning_rate = 0.05
  checkpoint.check_config_compatible(str(tmp_path), config)
  config.model = 'plain20'
  config.stage_sizes = (2, 2, 2)
  with pytest.raises(ValueError, match=r"model: 'resnet20' -> 'plain20'; "
                     r'stage_sizes: \[1, 1, 1\] -> \[2, 2, 2\]'):
    checkpoint.check_config_compatible(str(tmp_path), config)
