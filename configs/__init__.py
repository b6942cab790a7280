"""Experiment configs: `python train.py --config=configs/<file>.py:<arg>`."""
