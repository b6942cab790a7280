"""Checkpoints with orbax, and the run's config.json beside them.

Checkpoints hold the train state as host numpy arrays (one copy, taken from
the first local device), so a checkpoint restores on any number of devices.
Every process must call `save` and `restore_latest`: orbax synchronises the
processes and lets the primary one write.
"""

import json
import math
import os
from typing import Any, TypeVar

from etils import epath
import flax.serialization
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
BEST_METRIC = 'eval/accuracy'

# Fields that change the shapes of the parameters or what they mean; a run
# restarted with a different value cannot use its checkpoints.
MODEL_SHAPE_FIELDS = ('model', 'shortcut', 'version', 'preactivation',
                      'num_filters', 'stage_sizes', 'dataset')

State = TypeVar('State')


def _jsonable(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json())


def check_config_compatible(workdir: str,
                            config: ml_collections.ConfigDict) -> None:
  """Refuses a config whose model differs from the one saved in `workdir`.

  Raises:
    ValueError: naming each changed field with its saved and new value.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  saved = json.loads(path.read_text())
  new = _jsonable(config)
  changed = [f'{k}: {saved.get(k)!r} -> {new.get(k)!r}'
             for k in MODEL_SHAPE_FIELDS if saved.get(k) != new.get(k)]
  if changed:
    raise ValueError(
        f'{path} was written for another model; changed fields: '
        f'{"; ".join(changed)}. Use a new workdir, or restore these fields.')


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the config as `workdir/config.json` (call on one process)."""
  path = epath.Path(workdir) / CONFIG_FILE
  tmp = path.with_name(CONFIG_FILE + '.tmp')
  tmp.write_text(json.dumps(_jsonable(config), indent=2, sort_keys=True))
  # Replace in one move so that a crash never leaves half a config.
  tmp.replace(path)


def _best_metric(metrics) -> float:
  # Checkpoints saved between evaluations carry no accuracy.
  return metrics.get(BEST_METRIC, -math.inf) if metrics else -math.inf


def create_manager(workdir: str,
                   checkpoints_to_keep: int) -> ocp.CheckpointManager:
  """Keeps the latest `checkpoints_to_keep` plus the best by eval accuracy."""
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=checkpoints_to_keep),
      checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=_best_metric, best_mode='max', preservation_policy=policy,
      cleanup_tmp_directories=True)
  # Orbax wants an absolute path; cloud paths (gs://...) already are.
  root = workdir if '://' in workdir else os.path.abspath(workdir)
  return ocp.CheckpointManager(
      epath.Path(root) / CHECKPOINT_DIR, options=options)


def save(manager: ocp.CheckpointManager, step: int, host_state,
         metrics: dict[str, float] | None = None) -> bool:
  """Saves `host_state` (numpy leaves) at `step`, unless already saved.

  `metrics` (eval results at this step) rank the checkpoint for keeping the
  best. Returns whether a save started; it finishes in the background.
  """
  if manager.latest_step() == step:
    return False
  tree = flax.serialization.to_state_dict(host_state)
  metrics = {k: float(v) for k, v in (metrics or {}).items()}
  return manager.save(step, args=ocp.args.StandardSave(tree),
                      metrics=metrics)


def restore_latest(manager: ocp.CheckpointManager,
                   host_state: State) -> tuple[State, int | None]:
  """The newest checkpoint restored into the structure of `host_state`.

  Returns `(host_state, None)` when the directory holds no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return host_state, None
  target = flax.serialization.to_state_dict(host_state)
  restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  return flax.serialization.from_state_dict(host_state, restored), step


def to_host(replicated_state: State) -> State:
  """One copy of a pmap-replicated state, as numpy arrays."""
  return jax.device_get(jax.tree.map(lambda x: x[0], replicated_state))
