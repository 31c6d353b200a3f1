# `make demo` and `make test` do all set-up themselves (scripts/install.sh) and then run.
PY ?= python3

.PHONY: install-runtime install-dev demo test compat

install-runtime:
	@PYTHON=$(PY) bash scripts/install.sh runtime

install-dev:
	@PYTHON=$(PY) bash scripts/install.sh dev

demo: install-runtime
	$(PY) -m residtap demo

test: install-dev
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# generate-time tests under the lowest supported and the newest transformers (.ci/run runs it)
compat: install-dev
	@PYTHON=$(PY) bash scripts/compat.sh
