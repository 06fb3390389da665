"""GPU probing through the CUDA driver API; absent GPUs are recorded, not guessed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from profiler import gpu, report
from profiler.stats import Stat


def test_gpu_is_found_and_measured_or_absent_with_a_reason():
    try:
        gpus = gpu.probe_gpus(gpu_mem_gib=1.0, repeats=2, copy_mib=64)
    except gpu.CudaUnavailable as e:
        assert str(e)  # e.g. "no CUDA driver (libcuda) on this device"
        pytest.skip(f"no CUDA GPU here: {e}")
    for g in gpus:
        assert g.name and 0 < g.vram_free_uncapped_gib <= g.vram_total_gib
        assert g.vram_free_gib == min(1.0, g.vram_free_uncapped_gib)  # --gpu-mem caps it
        assert 10 < g.bandwidth_gbps.mean < 20_000  # GB/s of VRAM traffic


def test_a_gpu_without_prima_ref_kernels_is_recorded_under_extra_only():
    g = gpu.GpuInfo(0, "NVIDIA H100 80GB HBM3", 79.2, 10.0, 78.7, Stat((2935.0, 2940.0)))
    run = SimpleNamespace(gpus=[g], gpu_reason="")
    extra = report._gpu_extra(run)
    assert extra["present"] and not extra["usable_by_prima_ref"]
    assert extra["devices"][0]["vram_free_gib"] == 10.0
    assert extra["devices"][0]["copy_bandwidth_gbps"] == pytest.approx(2937.5)
    absent = report._gpu_extra(SimpleNamespace(gpus=[], gpu_reason="no CUDA driver"))
    assert absent == {"present": False, "reason": "no CUDA driver"}
