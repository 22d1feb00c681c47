# The two commands of the quick start. Each does its own set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.installed-core
TEST := $(VENV)/.installed-test

.PHONY: test demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(CORE): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $(CORE)

$(TEST): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(TEST) $(CORE)

# Fine-tune the embedded demo (configs/demo.yaml) end to end: data, LoRA, eval, PEFT export, sample.
demo: $(CORE)
	$(BIN)/python -m unsloth_jax.train

test: $(TEST)
	$(BIN)/python -m pytest -n 2 tests

clean:
	rm -rf $(VENV) runs
