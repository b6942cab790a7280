"""Test set-up shared by every test module.

Four simulated CPU devices let the pmapped steps and the cross-device
BatchNorm really run; this must be set before jax is first imported.
"""

import os

# The tests run tiny networks for a few steps, so XLA's compile time dwarfs
# run time: skipping its expensive optimisations makes the suite several
# times faster without changing what the tests check.
os.environ.setdefault(
    'XLA_FLAGS', '--xla_force_host_platform_device_count=4'
    ' --xla_backend_optimization_level=0'
    ' --xla_llvm_disable_expensive_passes=true')
# Keep TensorFlow (used only by tf.data) from competing for the two cores'
# worth of threads with XLA, and quiet its start-up chatter.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
