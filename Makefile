# One-command set-up: each target creates .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default

.PHONY: venv train test clean

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

clean:
	rm -rf $(VENV) .pytest_cache
