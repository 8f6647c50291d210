#!/usr/bin/env bash
# Installs coatvit into .venv, trains coat_lite_tiny on the built-in dataset, then predicts with the result.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[train]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/coatvit info coat_lite_tiny
