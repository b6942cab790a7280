"""Deep residual networks (He et al., 2015) in JAX and Flax.

Modules: `models` (the Linen networks), `input_pipeline` (TFDS and tf.data),
`train` (train state, steps, checkpoints and the training loop).
"""
