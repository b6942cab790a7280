"""Every config field, with the defaults the other configs build on.

A field is read by the model (`resnet.models`), the input pipeline
(`resnet.input_pipeline`) or the training library (`resnet.train`); all
are flat so that `--config.<field>=<value>` overrides any of them.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The shared fields; the experiment configs set what they need."""
  config = ml_collections.ConfigDict()

  # Model: a name from resnet.models.names(); ''/0/() keep its defaults.
  config.model = 'resnet20'
  config.shortcut = ''  # 'A' (zero-padding), 'B' (projection when needed), 'C'.
  config.version = ''  # 'v1' (stride on the first 1x1) or 'v1.5' (on the 3x3).
  config.preactivation = False
  config.zero_init_residual = False
  config.num_filters = 0
  config.stage_sizes = ()
  config.half_precision = False  # Compute in half_precision_dtype.
  config.half_precision_dtype = 'bfloat16'  # Or 'float16' (loss scaling).
  config.bn_group_size = 0  # Examples per BatchNorm group; 0: global batch.

  # Input: a TFDS name ('digits' ships with the code) and its recipe.
  config.dataset = 'digits'
  config.data_dir = ''  # '' is the TFDS default, ~/tensorflow_datasets.
  config.train_split = ''
  config.eval_split = ''
  config.validation_holdout = 0  # Train examples held out as the eval split.
  config.recipe = ''  # '' picks by dataset: 'digits', 'cifar', 'imagenet'.
  config.image_size = 0  # 0: the recipe's size.
  config.normalization = ''  # '' by recipe; 'per_pixel_mean', 'per_channel'.
  config.scale_augmentation = False  # The paper's ImageNet resizing.
  config.cache = True
  config.shuffle_buffer_size = 16_384
  config.batch_size = 128  # Global, over all devices and processes.
  config.eval_batch_size = 0  # 0: batch_size.
  config.prefetch_size = 2  # Batches placed on the devices ahead of use.
  config.seed = 0

  # Optimizer: SGD with momentum; L2 weight decay on conv/dense kernels.
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.weight_decay_mode = 'coupled'  # Or 'decoupled' (SGDW).
  config.decay_batchnorm_and_bias = False
  config.label_smoothing = 0.0
  config.grad_clip_norm = 0.0  # 0: no clipping.

  # Schedule: the peak rate, its decay and an optional warm-up.
  config.learning_rate = 0.1
  config.schedule = 'piecewise'  # Or 'cosine', 'constant'.
  config.boundaries_steps = ()  # Piecewise: multiply by decay_factor at...
  config.boundaries_epochs = ()  # ... these steps, or these epochs.
  config.decay_factor = 0.1
  config.warmup_mode = 'linear'  # Or 'constant' (the paper's ResNet-110).
  config.warmup_epochs = 0.0
  config.warmup_steps = 0  # Overrides warmup_epochs when positive.
  config.warmup_learning_rate = 0.0
  config.num_epochs = 1.0
  config.num_train_steps = 0  # Overrides num_epochs when positive.

  # Logging, evaluation and checkpoints.
  config.log_every_steps = 100
  config.eval_every_steps = 0  # 0: only at the end.
  config.checkpoint_every_steps = 0  # 0: after evaluations and at the end.
  config.checkpoints_to_keep = 3  # Plus the best by eval accuracy.
  return config
