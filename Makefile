# One-command set-up: each target creates .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default

.PHONY: venv train test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Trains resnet20 on the embedded digits data set (no download needed).
train: venv
	$(PY) train.py --config=configs/default.py --workdir=$(WORKDIR)

test: venv
	$(PY) -m pytest -q tests

# The README's CPU throughput table: the train step of resnet20, resnet18 and
# resnet50, jitted on one device and pmapped over two host devices.
bench: venv
	$(PY) benchmark.py --config=configs/cifar10.py --mode=step --devices=1,2 \
	    --num_steps=20 --warmup_steps=3
	$(PY) benchmark.py --config=configs/imagenet.py --config.model=resnet18 \
	    --config.batch_size=32 --mode=step --devices=1,2 --num_steps=8 \
	    --warmup_steps=2
	$(PY) benchmark.py --config=configs/imagenet.py --config.model=resnet50 \
	    --config.batch_size=16 --mode=step --devices=1,2 --num_steps=6 \
	    --warmup_steps=2

clean:
	rm -rf $(VENV) .pytest_cache
