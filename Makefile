# `make demo` and `make test` do all set-up themselves (scripts/install.sh) and then run.
PY ?= python3

.PHONY: install demo test lint bench

install:
	@PYTHON=$(PY) bash scripts/install.sh

demo: install
	$(PY) -m residtap demo

test: install
	$(PY) -m ruff check residtap tests bench examples
	$(PY) -m pytest -q

bench: install
	$(PY) bench/run_all.py
