# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment first if it is missing.

VENV   ?= .venv
PYTHON ?= python3
# torch and torchvision must come from the same build; override for another CUDA/CPU build.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cure-lirpa-installed
RUN    ?= runs/demo

.PHONY: install demo test lint format

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	# auto-LiRPA 0.3's metadata pins torch<1.13: install it without its pins (see cure_lirpa/bounds/lirpa.py)
	$(PY) -m pip install --quiet --no-deps auto-LiRPA==0.3
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on built-in defaults: certified multi-norm training on the shipped MNIST sample,
# then verification under l∞ 0.1 and l2 0.5 (a few minutes on 2 CPU cores).
demo: install
	$(VENV)/bin/cure-lirpa train --out $(RUN) --overwrite
	$(VENV)/bin/cure-lirpa verify $(RUN)/checkpoint.pt --threat linf:0.1 --threat l2:0.5 \
		--method ibp --method crown-ibp --count 500 --out $(RUN)/verify --overwrite

test: install
	$(PY) -m pytest tests

lint: install
	$(VENV)/bin/ruff format --check cure_lirpa tests benchmarks examples
	$(VENV)/bin/ruff check cure_lirpa tests benchmarks examples

format: install
	$(VENV)/bin/ruff format cure_lirpa tests benchmarks examples
	$(VENV)/bin/ruff check --fix cure_lirpa tests benchmarks examples
