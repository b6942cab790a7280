"""Deep residual networks (He et al., 2015) in JAX and Flax.

Modules: `models` (the Linen networks), `input_pipeline`, `preprocessing`
and `digits` (TFDS and tf.data), `train`, `optim`, `plan`, `checkpoint` and
`reporting` (the training library), `distributed` (multi-host start-up and
preemption), `sweep` and `sweep_report` (ablations).
"""
