#!/usr/bin/env bash
# Installs coatvit with its test dependencies into .venv and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pipefail makes a failed install stop here, with pip's own error, instead of failing later in pytest.
.venv/bin/pip install -q --no-cache-dir --disable-pip-version-check -e ".[dev]" 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
