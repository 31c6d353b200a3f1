# `make demo` and `make test` do all set-up themselves (scripts/install.sh) and then run.
PY ?= python3

.PHONY: install demo test

install:
	@PYTHON=$(PY) bash scripts/install.sh

demo: install
	$(PY) -m residtap demo

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

