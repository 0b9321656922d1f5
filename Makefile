# The README's two commands: `make run` (set up, then train the default model) and
# `make test` (set up, then run the test suite). .ci/run runs `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test
setup:
	@bash scripts/setup.sh

run: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)
