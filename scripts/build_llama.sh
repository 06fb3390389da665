#!/usr/bin/env bash
# Install llama-cpp-python 0.3.36 (the reference peer for tests/data/oracle and bench/) into
# .venv, built from source with the x86 SIMD flags this CPU reports in /proc/cpuinfo.
# A native build crashes in ggml's AMX matmul on this project's VMs, and a VM may hide
# extensions its CPU model has (the 2026-12-02 Zen 4 VM: no AVX512-VBMI, no AVX-VNNI; a
# build with them on dies of SIGILL), so every flag follows what the kernel reports; AMX stays
# off. --dry-run prints the CMAKE_ARGS and installs nothing. About 6 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
on() { if grep -qw "$1" <<<"$flags"; then echo ON; else echo OFF; fi; }
avx512=$( [ "$(on avx512f)" = ON ] && [ "$(on avx512bw)" = ON ] && [ "$(on avx512vl)" = ON ] \
  && echo ON || echo OFF )
args="-DGGML_NATIVE=OFF -DGGML_AVX=$(on avx) -DGGML_AVX2=$(on avx2) -DGGML_FMA=$(on fma)"
args+=" -DGGML_F16C=$(on f16c) -DGGML_BMI2=$(on bmi2) -DGGML_AVX_VNNI=$(on avx_vnni)"
args+=" -DGGML_AVX512=$avx512 -DGGML_AVX512_VBMI=$(on avx512_vbmi)"
args+=" -DGGML_AVX512_VNNI=$(on avx512_vnni) -DGGML_AVX512_BF16=$(on avx512_bf16)"
args+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
echo "CMAKE_ARGS=$args"
if [ "${1:-}" = "--dry-run" ]; then exit 0; fi
CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  .venv/bin/python -m pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36
# --no-deps keeps pip from reinstalling numpy under the project; its other runtime needs:
.venv/bin/python -m pip install diskcache jinja2 typing-extensions
