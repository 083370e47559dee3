# Two commands matter: `make demo` and `make test`. Both set up .venv first when needed.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first and on its own so that no other requirement pulls a different build.
# On this project's CI machines `torch==2.13.0` resolves to a CPU wheel on local disk. On a GPU
# machine PyPI's Linux x86_64 wheel is a CUDA build; choose another CUDA build with e.g.
#   make setup TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url <PyTorch CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# the project's extras: the test tools here; none in the container image (Dockerfile)
EXTRAS ?= [dev]
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup.stamp
# No MLflow telemetry. (A Ray that dinor1 starts itself, as `make demo`, `make bench` and the
# tests do, is loopback-only by its own choice; a Ray cluster is never told so.)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup demo test lint bench sweep clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".$(EXTRAS)"
	touch $(STAMP)

demo: setup
	$(BIN)/dinor1 demo --out demo_output

# GRQO's settings vs SFT, 5 paired seeds, on the long-tailed synthetic benchmark (Ray Tune;
# ~1 h on 2 CPUs, see jobs/sweeps/grqo_small.yaml); run again to resume
SWEEP_DATA := sweep_output/data
sweep: setup
	$(BIN)/dinor1 data synth $(SWEEP_DATA) --num-train 1000 --num-val 200 --num-test 200 \
	  --num-support 200 --num-categories 16 --num-novel 4 --long-tail 2.5 --num-hard-distractors 2
	$(BIN)/dinor1 sweep jobs/sweeps/grqo_small.yaml

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/dinor1 bench data

clean:
	rm -rf $(VENV) demo_output sweep_output .pytest_cache
