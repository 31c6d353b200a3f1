#!/usr/bin/env bash
# The generate-time tests (capture, probe bank, logit and tuned lens, steering, architectures)
# under the LOWEST supported transformers (constraints/lowest.txt) and the NEWEST release pip
# can find (transformers<6, unpinned: a new release that breaks residtap turns CI red). Each in
# its own virtualenv under .venvs/, sharing the installed torch and residtap
# (--system-site-packages); pip's wheel cache makes reruns quick. Run by .ci/run after make test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TESTS=(tests/test_generate.py tests/test_architectures.py tests/test_capture.py
       tests/test_bank.py tests/test_lens.py tests/test_tuned_lens.py tests/test_steer.py)
for which in ${@:-lowest newest}; do
  venv=".venvs/transformers-$which"
  [ -x "$venv/bin/python" ] || "$PY" -m venv --system-site-packages "$venv"
  if [ "$which" = lowest ]; then
    "$venv/bin/python" -m pip install -q -c constraints/lowest.txt transformers
  else
    "$venv/bin/python" -m pip install -q --upgrade "transformers<6"
  fi
  version=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)")
  echo "compat: transformers $version ($which)"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
done
