"""Training library: train state, pmapped steps and the training loop.

Data parallel over the local devices with `jax.pmap` on the axis 'batch':
gradients are averaged over it, BatchNorm takes its statistics over it (the
global batch, or groups of `bn_group_size` examples), and metrics are summed
over it on the devices.
"""

import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from absl import logging
from clu import periodic_actions
from etils import epath
from flax import jax_utils
from flax import struct
from flax.training import dynamic_scale as dynamic_scale_lib
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from resnet import checkpoint
from resnet import distributed
from resnet import input_pipeline
from resnet import models
from resnet import optim
from resnet import plan as plan_lib
from resnet import reporting

AXIS = 'batch'
TOP_K = 5


class TrainState(struct.PyTreeNode):
  """Everything a step changes: one pytree, checkpointed as a whole.

  `rng` is the run's base key; step `t` draws from `fold_in(rng, t)`, so a
  restarted run draws what an uninterrupted one would. `dynamic_scale` is the
  float16 loss scale (None in float32 and bfloat16).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  rng: jax.Array
  dynamic_scale: dynamic_scale_lib.DynamicScale | None = None


def compute_dtype(config: ml_collections.ConfigDict) -> str:
  """The dtype convs and BatchNorm compute in; parameters stay float32."""
  return config.half_precision_dtype if config.half_precision else 'float32'


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 axis_index_groups: Sequence[Sequence[int]] | None = None):
  """The network named by `config.model`, with BatchNorm over 'batch'.

  Raises:
    ValueError: from `models.create`, for an unknown model or override.
  """
  return models.create(
      config.model, num_classes=num_classes,
      shortcut=config.shortcut or None, version=config.version or None,
      preactivation=config.preactivation,
      zero_init_residual=config.zero_init_residual,
      num_filters=config.num_filters or None,
      stage_sizes=tuple(config.stage_sizes) or None,
      dtype=compute_dtype(config), axis_name=AXIS,
      axis_index_groups=axis_index_groups)


def create_train_state(config: ml_collections.ConfigDict, model,
                       tx: optax.GradientTransformation,
                       image_shape: Sequence[int]) -> TrainState:
  """Initialises the train state from `config.seed`, jitted, on one device.

  He et al. initialise the weights as in their PReLU paper; the model's
  initialisers do that.
  """
  def init(key):
    params_key, state_key = jax.random.split(key)
    images = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init(params_key, images, train=False)
    params = variables['params']
    scale = None
    if config.half_precision and config.half_precision_dtype == 'float16':
      # Arrays rather than Python numbers, so that pmap and orbax see them.
      scale = dynamic_scale_lib.DynamicScale(
          fin_steps=jnp.zeros((), jnp.int32),
          scale=jnp.asarray(2.0**16, jnp.float32))
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get('batch_stats', {}),
        opt_state=tx.init(params), rng=state_key, dynamic_scale=scale)

  key = jax.random.PRNGKey(config.seed)
  options = {}
  if jax.default_backend() == 'cpu':
    # NOTE: XLA's CPU backend spends tens of seconds optimising the
    # initialisers' normal draws (resnet20: 35 s, against 7 s unoptimised);
    # init runs once, so it is compiled without optimisation there.
    options = {'xla_backend_optimization_level': 0}
  return jax.jit(init).lower(key).compile(compiler_options=options)(key)


def replicate(tree, devices: Sequence[jax.Device] | None = None):
  """A copy of `tree` on each device, stacked on a leading axis.

  The copies are laid out as the pmapped steps lay out their outputs (a
  mesh axis named 'batch'), so the first step's inputs and its outputs
  share one compiled program instead of compiling the step twice.
  """
  return jax_utils.replicate(tree, devices, axis_name=AXIS)


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy, with optional label smoothing."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def zero_train_metrics() -> dict[str, jax.Array]:
  """The on-device sums `train_step` accumulates between two logs."""
  names = ('loss_sum', 'correct', 'count', 'skipped_steps', 'learning_rate')
  return {name: jnp.zeros((), jnp.float32) for name in names}


def train_step(state: TrainState, metrics: dict[str, jax.Array],
               batch: dict[str, jax.Array], *, model,
               tx: optax.GradientTransformation,
               learning_rate_fn: optim.LearningRateFn,
               label_smoothing: float = 0.0,
               skip_nonfinite: bool = False):
  """One SGD step on this device's shard; run under pmap over 'batch'.

  A step whose averaged gradients are not finite changes nothing but the
  step counter and the loss scale, and is counted in `skipped_steps`. With
  `skip_nonfinite` it also stays out of the loss and accuracy sums;
  otherwise its loss, NaN or infinite, reaches them and stops the run.
  Returns the new state and `metrics` plus this step's sums.
  """
  step_key = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    logits, updated = model.apply(
        variables, batch['image'], train=True, mutable=['batch_stats'],
        rngs={'dropout': step_key})
    loss = cross_entropy(logits, batch['label'], label_smoothing).mean()
    return loss, (logits, updated['batch_stats'])

  if state.dynamic_scale is not None:
    # float16: scale the loss up so small gradients survive, then check.
    grad_fn = state.dynamic_scale.value_and_grad(
        loss_fn, has_aux=True, axis_name=AXIS)
    scale, finite, (loss, (logits, batch_stats)), grads = grad_fn(
        state.params)
  else:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, batch_stats)), grads = grad_fn(state.params)
    grads = lax.pmean(grads, AXIS)
    scale, finite = None, _all_finite(grads)

  learning_rate = learning_rate_fn(state.step)
  direction, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, d: p + learning_rate * d,
                        state.params, direction)
  keep_if_finite = lambda new, old: jax.tree.map(
      functools.partial(jnp.where, finite), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep_if_finite(params, state.params),
      batch_stats=keep_if_finite(batch_stats, state.batch_stats),
      opt_state=keep_if_finite(opt_state, state.opt_state),
      dynamic_scale=scale)

  # Sums over the global batch; `finite` is the same on every device.
  sums = lax.psum({
      'loss_sum': loss * batch['label'].shape[0],
      'correct': jnp.sum(jnp.argmax(logits, -1) == batch['label']),
      'count': batch['label'].shape[0],
  }, AXIS)
  if skip_nonfinite:
    sums = jax.tree.map(lambda s: jnp.where(finite, s, 0), sums)
  metrics = {
      'loss_sum': metrics['loss_sum'] + sums['loss_sum'],
      'correct': metrics['correct'] + sums['correct'],
      'count': metrics['count'] + sums['count'],
      'skipped_steps': metrics['skipped_steps'] + (1 - finite),
      'learning_rate': learning_rate.astype(jnp.float32),
  }
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model):
  """Masked sums of loss and top-1/top-5 hits over the global batch."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = model.apply(variables, batch['image'], train=False)
  labels, mask = batch['label'], batch['mask']
  top_k = lax.top_k(logits, min(TOP_K, logits.shape[-1]))[1]
  return lax.psum({
      'loss_sum': jnp.sum(cross_entropy(logits, labels) * mask),
      'correct': jnp.sum((top_k[:, 0] == labels) * mask),
      'top5_correct': jnp.sum(
          jnp.any(top_k == labels[:, None], axis=-1) * mask),
      'count': jnp.sum(mask),
  }, AXIS)


def make_p_train_step(model, tx: optax.GradientTransformation,
                      learning_rate_fn: optim.LearningRateFn,
                      label_smoothing: float = 0.0,
                      devices: Sequence[jax.Device] | None = None,
                      skip_nonfinite: bool = False):
  """`train_step` pmapped over `devices`, donating the state and sums."""
  step = functools.partial(
      train_step, model=model, tx=tx, learning_rate_fn=learning_rate_fn,
      label_smoothing=label_smoothing, skip_nonfinite=skip_nonfinite)
  return jax.pmap(step, axis_name=AXIS, devices=devices,
                  donate_argnums=(0, 1))


def make_p_eval_step(model, devices: Sequence[jax.Device] | None = None):
  return jax.pmap(functools.partial(eval_step, model=model),
                  axis_name=AXIS, devices=devices)


def evaluate(p_eval_step: Callable, state: TrainState,
             eval_batches: Iterable[Any]) -> dict[str, float]:
  """Loss, top-1 and top-5 accuracy over the whole eval split.

  `eval_batches` is `input_pipeline.create_eval_iterator(config)`, built once
  per run (it holds the cache); padding examples are masked out.
  """
  batches = input_pipeline.prefetch_to_device(iter(eval_batches), 2)
  # Collect the per-batch sums on the devices and fetch them once.
  sums = jax.device_get([p_eval_step(state, batch) for batch in batches])
  total = {k: float(sum(np.asarray(s[k])[0] for s in sums))
           for k in ('loss_sum', 'correct', 'top5_correct', 'count')}
  count = max(total['count'], 1.0)
  return {
      'eval/loss': total['loss_sum'] / count,
      'eval/accuracy': total['correct'] / count,
      'eval/top5_accuracy': total['top5_correct'] / count,
      'eval/num_examples': int(total['count']),
  }


def summarize_train_metrics(sums: dict[str, Any]) -> dict[str, float]:
  """Means over the examples since the last log (`sums` from one device)."""
  count = max(float(sums['count']), 1.0)
  return {
      'train/loss': float(sums['loss_sum']) / count,
      'train/accuracy': float(sums['correct']) / count,
      'train/learning_rate': float(sums['learning_rate']),
      'train/skipped_steps': int(sums['skipped_steps']),
  }


def check_loss_finite(sums: dict[str, Any], first_step: int,
                      last_step: int, manager) -> None:
  """Stops the run if the mean training loss in `sums` is NaN or infinite.

  Called before every metrics write and checkpoint save with the sums of
  the steps since the last call, so that no checkpoint is saved after a bad
  step and the newest one is the last good one. The sums are reduced over
  all devices, so every process takes the same decision.

  Raises:
    FloatingPointError: naming the steps and the last good checkpoint.
  """
  loss = summarize_train_metrics(checkpoint.to_host(sums))['train/loss']
  if math.isfinite(loss):
    return
  manager.wait_until_finished()
  good = manager.latest_step()
  saved = ('no checkpoint was saved before them' if good is None else
           f'the last good checkpoint, step {good} in '
           f'{manager.directory / str(good)}, is intact and a restart '
           'resumes from it')
  raise FloatingPointError(
      f'Training loss is {loss} in steps {first_step}-{last_step}; {saved}. '
      'Lower the learning rate, or set config.skip_nonfinite_steps=True to '
      'skip such steps.')


def _close(manager, writer) -> None:
  """Waits for the checkpoint being written, then closes both."""
  manager.wait_until_finished()
  manager.close()
  writer.close()


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> TrainState:
  """Trains and evaluates as `config` says, writing to `workdir`.

  Resumes from the newest checkpoint in `workdir`, with the data stream at
  the same position. Returns the final state, replicated over the local
  devices (`checkpoint.to_host` gives one numpy copy).

  Raises:
    ValueError: for a bad config or workdir, before anything is compiled.
    FloatingPointError: when the training loss is not finite.
    distributed.Preempted: after saving, once any process got SIGTERM
      (inside `distributed.catch_sigterm`).
  """
  start_time = time.time()
  # Check the config, data set, model, optimizer and workdir first.
  plan_lib.check_workdir(workdir)
  plan = plan_lib.plan_run(config)
  groups = plan_lib.batchnorm_groups(config, plan.device_count,
                                     plan.per_device_batch_size)
  model = create_model(config, plan.dataset_info.num_classes, groups)
  tx = optim.create_optimizer(config)
  learning_rate_fn = optim.create_learning_rate_fn(
      config, plan.steps_per_epoch, plan.num_train_steps)
  checkpoint.check_config_compatible(workdir, config)
  num_steps = plan.num_train_steps

  # Set up the workdir: config.json, metric writer, checkpoint manager.
  is_writer = jax.process_index() == 0
  if is_writer:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    checkpoint.save_config(workdir, config)
  writer = reporting.create_writer(workdir, is_writer)
  manager = checkpoint.create_manager(workdir, config.checkpoints_to_keep)

  # Initialise the state, restore the newest checkpoint, replicate.
  host_state = jax.device_get(create_train_state(
      config, model, tx, plan.dataset_info.image_shape))
  host_state, restored_step = checkpoint.restore_latest(manager, host_state)
  reporting.log_run(config, plan, model, restored_step)
  start_step = int(host_state.step)
  state = replicate(host_state)

  # Stream the training data from `start_step`, prefetched to the devices.
  train_iter = input_pipeline.prefetch_to_device(
      input_pipeline.create_train_iterator(config, start_step=start_step),
      config.prefetch_size)
  p_train_step = make_p_train_step(
      model, tx, learning_rate_fn, config.label_smoothing,
      skip_nonfinite=config.skip_nonfinite_steps)
  p_eval_step = make_p_eval_step(model)
  eval_batches = input_pipeline.create_eval_iterator(config)
  progress = (periodic_actions.ReportProgress(
      num_train_steps=num_steps, every_steps=config.log_every_steps,
      every_secs=None) if is_writer else None)
  sums = replicate(zero_train_metrics())
  timer = reporting.LoopTimer()
  # Steps up to `checked_step` had a finite loss.
  last_log_step = checked_step = start_step
  eval_metrics = {}

  logging.info('Training steps %d to %d; the first step compiles.',
               start_step + 1, num_steps)
  # `step` counts the steps done, as the state's counter will after it.
  for step in range(start_step + 1, num_steps + 1):
    # Wait for the next batch; time spent here is input wait.
    waited = time.perf_counter()
    batch = next(train_iter)
    timer.add('input_s', waited)

    # Run one step; donation reuses the state's buffers in place.
    dispatched = time.perf_counter()
    state, sums = p_train_step(state, sums, batch)

    # Time the first step apart: it holds the compilation.
    if step == start_step + 1:
      jax.block_until_ready(sums)
      logging.info('Compiled and ran the first step in %.1f s, after '
                   '%.1f s waiting for the first batch.',
                   time.perf_counter() - dispatched, timer.input_s)
      timer.reset()
      last_log_step = step

    # Every log_every_steps, fetch the summed metrics (the only sync, with
    # the preemption check of a multi-process run).
    if step % config.log_every_steps == 0 or step == num_steps:
      check_loss_finite(sums, checked_step + 1, step, manager)
      checked_step = step
      scalars = summarize_train_metrics(checkpoint.to_host(sums))
      if step > last_log_step:
        scalars.update(timer.speed(step - last_log_step, config.batch_size))
      writer.write_scalars(step, scalars)
      sums = replicate(zero_train_metrics())
      timer.reset()
      last_log_step = step
    # After the sync, so that its steps/s and ETA count finished steps.
    if progress:
      progress(step)

    # Evaluate every eval_every_steps and at the end; checkpoint after.
    is_eval_step = step == num_steps or (
        config.eval_every_steps and step % config.eval_every_steps == 0)
    if is_eval_step or (config.checkpoint_every_steps and
                        step % config.checkpoint_every_steps == 0):
      # Let the queued steps finish, so that their time counts as steps.
      jax.block_until_ready(state)
      started = time.perf_counter()
      if is_eval_step:
        eval_metrics = evaluate(p_eval_step, state, eval_batches)
        writer.write_scalars(step, eval_metrics)
        logging.info('Epoch %.2f: eval accuracy %.4f.', step /
                     plan.steps_per_epoch, eval_metrics['eval/accuracy'])
      check_loss_finite(sums, checked_step + 1, step, manager)
      checked_step = step
      checkpoint.save(manager, step, checkpoint.to_host(state),
                      eval_metrics if is_eval_step else None)
      timer.add('other_s', started)

    # After a preemption notice, all processes save this step and stop.
    if step < num_steps and distributed.should_stop(
        step, config.preemption_check_every_steps):
      check_loss_finite(sums, checked_step + 1, step, manager)
      checkpoint.save(manager, step, checkpoint.to_host(state))
      _close(manager, writer)
      raise distributed.Preempted(step, str(manager.directory))

  # A run restored at its end only evaluates.
  if start_step >= num_steps:
    eval_metrics = evaluate(p_eval_step, state, eval_batches)
    writer.write_scalars(start_step, eval_metrics)

  # Wait for the last checkpoint, then mark the run as done.
  _close(manager, writer)
  if is_writer:
    reporting.write_done(workdir, max(start_step, num_steps),
                         time.time() - start_time, eval_metrics)
  return state
