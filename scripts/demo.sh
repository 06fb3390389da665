#!/usr/bin/env bash
# Set up, fetch the default model, and run the main job on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m prima_ref.demo "$@"
