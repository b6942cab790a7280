"""Deep residual networks (He et al., 2015) in JAX and Flax.

Modules: `models` (the Linen networks), `input_pipeline` (TFDS and tf.data),
`train` (train state, steps and the training loop), with `optim` (SGD and
schedules), `plan` (config checks, batch arithmetic), `checkpoint` (orbax)
and `reporting` (metric writers and the run log).
"""
