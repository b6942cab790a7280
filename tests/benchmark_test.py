"""Tests for resnet.benchmark, benchmark.py and resnet.host_devices.

Every mode runs for two or three steps of configs/default.py:tiny on the
digits and must report positive, finite figures; no timing is asserted.
The step mode runs through the launcher, as the README's commands do.
"""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from configs import default
from resnet import benchmark
from resnet import host_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ('images_per_sec', 'step_time_ms', 'compile_time_s',
            'flops_per_image', 'achieved_flops')


def _assert_positive_finite(result, keys):
  for key in keys:
    value = result[key]
    assert isinstance(value, (int, float)), (key, value)
    assert math.isfinite(value) and value > 0, (key, value)


@pytest.fixture(scope='module')
def step_json():
  command = [sys.executable, 'benchmark.py',
             '--config=configs/default.py:tiny', '--mode=step', '--json',
             '--num_steps=2', '--warmup_steps=1', '--devices=2']
  output = subprocess.run(command, cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout
  return json.loads(output.strip().splitlines()[-1])


def test_step_mode_reports_required_figures(step_json):
  _assert_positive_finite(step_json, REQUIRED + (
      'peak_flops', 'fraction_of_peak', 'model_flops_per_image'))
  assert step_json['mode'] == 'step'
  assert step_json['devices'] == 2
  assert (step_json['batch'], step_json['dtype']) == (32, 'float32')
  assert step_json['peak_source'] == 'measured matmul'
  # XLA's count is near 3x the forward multiply-adds x 2 (it skips the
  # stem's input gradient and adds BatchNorm): within a factor of two.
  ratio = step_json['flops_per_image'] / step_json['model_flops_per_image']
  assert 0.5 < ratio < 2, ratio


def test_step_mode_uses_given_peak_and_image_size():
  config = default.get_config('tiny')
  result = benchmark.benchmark_step(
      config, devices=jax.local_devices()[:1], num_steps=1, warmup_steps=1,
      image_size=16, peak_flops=1e12)
  _assert_positive_finite(result, REQUIRED)
  assert (result['image_size'], result['devices']) == (16, 1)
  assert result['peak_flops'] == 1e12
  assert result['fraction_of_peak'] == pytest.approx(
      result['achieved_flops'] / 1e12)


def test_input_mode_reports_images_per_sec():
  result = benchmark.benchmark_input(
      default.get_config('tiny'), num_batches=3, warmup_batches=1)
  _assert_positive_finite(
      result, ('images_per_sec', 'batch_time_ms', 'first_batch_s'))
  assert (result['dataset'], result['recipe']) == ('digits', 'digits')


def test_loop_mode_reports_input_wait():
  config = default.get_config('tiny')
  result = benchmark.benchmark_loop(
      config, devices=jax.local_devices()[:2], num_steps=3, warmup_steps=1,
      peak_flops=1e12)
  _assert_positive_finite(result, REQUIRED)
  assert 0 <= result['input_wait_fraction'] <= 1


def test_batch_not_divisible_by_devices_is_rejected():
  config = default.get_config('tiny')
  config.batch_size = 30
  with pytest.raises(ValueError, match='batch_size=30'):
    benchmark.synthetic_batch(config, jax.local_devices()[:4], (8, 8, 3), 10)


def test_measured_peak_is_positive():
  peak = benchmark.measure_peak_flops(jax.local_devices()[:2], size=64,
                                      repeats=1)
  assert math.isfinite(peak) and peak > 0


@pytest.mark.parametrize('analysis,expected', [
    ({'flops': 6.0}, 6.0), ([{'flops': 4.0}], 4.0), ({}, 0.0), ([], 0.0)])
def test_flops_of_reads_dict_or_list(analysis, expected):
  class Compiled:
    def cost_analysis(self):
      return analysis
  assert benchmark.flops_of(Compiled()) == expected


def test_format_table_has_a_line_per_row():
  rows = [{'model': 'a', 'images_per_sec': 1.5}, {'model': 'b'}]
  lines = benchmark.format_table(rows, ('model', 'images_per_sec'))
  assert len(lines.splitlines()) == 4  # Header, rule, two rows.
  single = benchmark.format_table(rows[:1], ('model', 'images_per_sec'))
  assert single.splitlines()[1].split() == ['images_per_sec', '1.5']


def test_host_device_count_divides_batches(monkeypatch):
  monkeypatch.delenv(host_devices.ENV, raising=False)
  monkeypatch.setattr(host_devices, 'cpu_cores', lambda: 4)
  assert host_devices.default_count([128]) == 4
  assert host_devices.default_count([6, 0]) == 3
  assert host_devices.default_count([7]) == 1
  monkeypatch.setenv(host_devices.ENV, '1')
  assert host_devices.default_count([128]) == 1
  monkeypatch.setenv(host_devices.ENV, 'two')
  with pytest.raises(ValueError, match='RESNET_HOST_DEVICES'):
    host_devices.default_count([128])


def test_xla_flags_win_over_configure():
  # tests/conftest.py forces 4 host devices through XLA_FLAGS.
  assert host_devices.forced_by_xla_flags()
  assert host_devices.configure(2) == 4
  with pytest.raises(ValueError, match='count=0'):
    host_devices.configure(0)
