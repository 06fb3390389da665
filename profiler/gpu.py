"""CUDA GPUs through the driver API (libcuda via ctypes): no toolkit or Python package needed.

Per GPU: name, free and total VRAM (free capped by `--gpu-mem`), and VRAM bandwidth from
device-to-device copies of a 256 MiB buffer (each copy reads and writes every byte, so the
figure is 2 x bytes / time: the traffic the memory sustained, which bounds a streaming read).

prima_ref has no CUDA kernels yet, so there is no per-quant-type matvec figure to measure, and
the device profile's planner-facing `gpu` stays null (prima-plan would otherwise put layers on
a GPU nothing can run them on); the measured GPU goes under `extra.gpu`. When GPU kernels land,
time them here as compute.py does for the CPU and fill `gpu.matvec`.
"""

from __future__ import annotations

import ctypes
import sys
import time
from dataclasses import dataclass

from profiler.stats import Stat

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    vram_total_gib: float
    vram_free_gib: float  # capped by --gpu-mem
    vram_free_uncapped_gib: float
    bandwidth_gbps: Stat | None


class CudaUnavailable(RuntimeError):
    pass


def _libcuda():
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise CudaUnavailable("no CUDA driver (libcuda) on this device")


def _check(cu, status: int, what: str) -> None:
    if status != 0:
        text = ctypes.c_char_p()
        cu.cuGetErrorString(status, ctypes.byref(text))
        raise CudaUnavailable(f"{what} failed: CUDA error {status} "
                              f"({(text.value or b'?').decode()})")


def probe_gpus(gpu_mem_gib: float | None, repeats: int, measure_bandwidth: bool = True,
               copy_mib: int = 256) -> list[GpuInfo]:
    """Every CUDA device; raises CudaUnavailable with the reason when there is none."""
    cu = _libcuda()
    _check(cu, cu.cuInit(0), "cuInit")
    count = ctypes.c_int()
    _check(cu, cu.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    if count.value == 0:
        raise CudaUnavailable("the CUDA driver sees no GPU")
    return [_probe_one(cu, i, gpu_mem_gib, repeats, measure_bandwidth, copy_mib)
            for i in range(count.value)]


def _probe_one(cu, index: int, gpu_mem_gib, repeats: int, measure_bandwidth: bool,
               copy_mib: int) -> GpuInfo:
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    _check(cu, cu.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    name = ctypes.create_string_buffer(256)
    _check(cu, cu.cuDeviceGetName(name, 256, dev), "cuDeviceGetName")
    _check(cu, cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    try:
        _check(cu, cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        _check(cu, cu.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "cuMemGetInfo")
        bandwidth = _copy_bandwidth(cu, copy_mib * MIB, repeats) if measure_bandwidth else None
    finally:
        cu.cuDevicePrimaryCtxRelease(dev)
    free_gib = free.value / GIB
    capped = free_gib if gpu_mem_gib is None else min(free_gib, gpu_mem_gib)
    return GpuInfo(index=index, name=name.value.decode(errors="replace"),
                   vram_total_gib=total.value / GIB, vram_free_gib=capped,
                   vram_free_uncapped_gib=free_gib, bandwidth_gbps=bandwidth)


def _copy_bandwidth(cu, n_bytes: int, repeats: int) -> Stat:
    src, dst = ctypes.c_uint64(), ctypes.c_uint64()
    _check(cu, cu.cuMemAlloc_v2(ctypes.byref(src), ctypes.c_size_t(n_bytes)), "cuMemAlloc")
    try:
        _check(cu, cu.cuMemAlloc_v2(ctypes.byref(dst), ctypes.c_size_t(n_bytes)), "cuMemAlloc")
        try:
            _check(cu, cu.cuMemsetD8_v2(src, ctypes.c_ubyte(1), ctypes.c_size_t(n_bytes)),
                   "cuMemsetD8")

            def copies(n: int) -> float:
                t0 = time.perf_counter()
                for _ in range(n):
                    _check(cu, cu.cuMemcpyDtoD_v2(dst, src, ctypes.c_size_t(n_bytes)),
                           "cuMemcpyDtoD")
                _check(cu, cu.cuCtxSynchronize(), "cuCtxSynchronize")
                return time.perf_counter() - t0

            copies(2)  # warm-up
            per_sample = 10
            return Stat(tuple(2 * n_bytes * per_sample / copies(per_sample) / 1e9
                              for _ in range(repeats)))
        finally:
            cu.cuMemFree_v2(dst)
    finally:
        cu.cuMemFree_v2(src)


if __name__ == "__main__":  # python -m profiler.gpu: a quick look without the rest
    try:
        for g in probe_gpus(None, 3):
            print(g.index, g.name, f"{g.vram_free_gib:.1f}/{g.vram_total_gib:.1f} GiB free",
                  f"{g.bandwidth_gbps.fmt(0)} GB/s")
    except CudaUnavailable as e:
        print(f"no GPU: {e}")
