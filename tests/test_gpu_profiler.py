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


def test_measured_kernels_make_a_gpu_entry_the_planner_reads():
    from types import SimpleNamespace

    from planner.profiles import _Fields, _gpu
    from profiler import report
    from profiler.stats import Stat

    mv = {"Q4_K": gpu.KernelMatvec("Q4_K", Stat((218.0, 220.0)), Stat((60.0, 61.0)), (8, 4096))}
    g = gpu.GpuInfo(0, "NVIDIA H200", 139.8, 100.0, 139.3, Stat((3354.0,)), matvec=mv)
    entry = report._gpu_profile(SimpleNamespace(gpus=[g]))
    parsed = _gpu(_Fields(entry, "test"), "linux")
    assert parsed.is_cuda and parsed.vram_free_gib == 100.0
    assert parsed.matvec["Q4_K"].gbps == 219.0
    extra = report._gpu_extra(SimpleNamespace(gpus=[g], gpu_reason=""))
    assert extra["usable_by_prima_ref"]
    assert report._gpu_profile(SimpleNamespace(gpus=[gpu.GpuInfo(0, "x", 1, 1, 1, None)])) is None
