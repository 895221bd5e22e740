# `make test` and `make train` create .venv on first use. TORCH_PIN installs the CPU wheel these
# machines serve locally; override it (e.g. `make TORCH_PIN=torch`) to take any torch>=2.6.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: test train test-fast lint bench bench-dp clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[train,dev]"
	touch $@

# The parity suites run twice: on the C++ core (built on first use), then on the Python passes.
PARITY := tests/test_mlp.py tests/test_mlp_paths.py tests/test_linear.py tests/test_linear_paths.py \
	tests/test_losses.py tests/test_modules.py tests/test_rules.py

test: $(BIN)/.installed
	MANUALBP_NATIVE=0 $(BIN)/python -m pytest -q $(PARITY)
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

train: $(BIN)/.installed
	$(BIN)/python train.py $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/run.py $(ARGS)

# Per-example norms / DP-SGD against Opacus, BackPACK and vmap. The peers are benchmark-only: this
# step installs them (torch pinned, so nothing pulls another torch); ARGS=--digits runs the
# DP-SGD digits comparison instead.
bench-dp: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)" "opacus>=1.5" "backpack-for-pytorch>=1.7"
	$(BIN)/python benchmarks/$(if $(filter --digits,$(ARGS)),dp_digits.py $(filter-out --digits,$(ARGS)),per_example.py $(ARGS))

clean:
	rm -rf $(VENV) logs outputs multirun .pytest_cache
