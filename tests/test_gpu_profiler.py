"""profile-tool's GPU kernel figures (profiler.gpu.kernel_matvec): real timings of prima_ref's
CUDA kernels, so they run only where numba.cuda finds a CUDA device."""

import os

import pytest

from profiler import gpu


def test_kernel_matvec_on_the_gpu_or_a_stated_skip():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the CUDA simulator has no speed to measure")
    try:
        mv = gpu.kernel_matvec(repeats=2, matrix_mib=16, qtypes=("Q4_0", "Q4_K", "F32"))
    except gpu.CudaUnavailable as e:
        pytest.skip(f"no CUDA device for prima_ref's kernels: {e}")
    assert sorted(mv) == ["F32", "Q4_0", "Q4_K"]
    for m in mv.values():
        assert m.shape[0] * m.shape[1] > 0 and 1 < m.gbps.mean < 50_000
