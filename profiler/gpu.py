"""CUDA GPUs: the driver API (libcuda via ctypes) for what any CUDA device has, and
prima_ref's own GPU kernels (prima_ref.gpu, numba.cuda) for what prima-ref gets from it.

Per GPU: name, free and total VRAM (free capped by `--gpu-mem`), and VRAM bandwidth from
device-to-device copies of a 256 MiB buffer (each copy reads and writes every byte, so the
figure is 2 x bytes / time: the traffic the memory sustained, which bounds a streaming read).
When numba.cuda can run prima_ref's kernels there, `kernel_matvec` times the decode matvec of
every GPU quant type on a weight matrix larger than the L2 (CUDA events, weight bytes / time):
the device profile's `gpu.matvec` that prima-plan reads.
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
    matvec: dict | None = None  # qtype -> KernelMatvec, when prima_ref's kernels ran here
    matvec_reason: str = ""  # why matvec is None


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


@dataclass(frozen=True)
class KernelMatvec:
    qtype: str
    gbps: Stat  # weight bytes streamed per second
    gflops: Stat  # 2 * rows * cols per matvec, per second
    shape: tuple[int, int]


# byte offsets of the f16 scales in one block: set to small finite values in the test matrix
_F16_FIELDS = {"Q4_0": (18, [0]), "Q4_1": (20, [0, 2]), "Q5_0": (22, [0]), "Q5_1": (24, [0, 2]),
               "Q8_0": (34, [0]), "Q4_K": (144, [0, 2]), "Q6_K": (210, [208])}
KERNEL_QTYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K", "F16", "F32")


def _matrix(qtype: str, n_rows: int, n_cols: int, rng):
    """(n_rows, row_bytes) uint8 of random blocks (never zeros) with finite scales."""
    import numpy as np

    if qtype == "F32":
        return rng.standard_normal((n_rows, n_cols), dtype=np.float32).view(np.uint8)
    if qtype == "F16":
        return rng.standard_normal((n_rows, n_cols)).astype(np.float16).view(np.uint8)
    block_bytes, fields = _F16_FIELDS[qtype]
    weights = 256 if qtype.endswith("_K") else 32
    blocks = rng.integers(0, 256, (n_rows * n_cols // weights, block_bytes), dtype=np.uint8)
    scale = np.full(blocks.shape[0], 0.01, np.float16).view(np.uint8).reshape(-1, 2)
    for off in fields:
        blocks[:, off:off + 2] = scale
    return blocks.reshape(n_rows, -1)


def kernel_matvec(repeats: int, matrix_mib: int = 256, n_cols: int = 4096,
                  qtypes=KERNEL_QTYPES) -> dict[str, KernelMatvec]:
    """Decode matvec (activation quantization included) of each type with prima_ref's GPU
    kernels; raises CudaUnavailable when numba.cuda has no device."""
    from prima_ref.gpu import cuda_status

    ok, why = cuda_status()
    if not ok or "simulator" in why:
        raise CudaUnavailable(why if not ok else "only the CUDA simulator: nothing to time")
    import numpy as np
    from gguf.constants import GGMLQuantizationType
    from numba import cuda

    from prima_ref.gpu.layer import Activation, GpuWeight, workspace

    ws, rng, out = workspace(), np.random.default_rng(0), {}
    for qtype in qtypes:
        raw1 = _matrix(qtype, 1, n_cols, rng)
        n_rows = max(1, (matrix_mib * MIB) // raw1.nbytes)
        w = GpuWeight(qtype, int(GGMLQuantizationType[qtype]), _matrix(qtype, n_rows, n_cols, rng))
        x = cuda.to_device(rng.standard_normal((1, n_cols)).astype(np.float32))
        w(Activation(ws, "prof", x), "prof.y")  # compile
        cuda.synchronize()
        secs = []
        for _ in range(max(1, repeats)):
            start, stop = cuda.event(), cuda.event()
            start.record()
            for _ in range(10):
                w(Activation(ws, "prof", x), "prof.y")
            stop.record()
            stop.synchronize()
            secs.append(cuda.event_elapsed_time(start, stop) / 1e3 / 10)
        out[qtype] = KernelMatvec(qtype, Stat(tuple(w.nbytes / s / 1e9 for s in secs)),
                                  Stat(tuple(2 * n_rows * n_cols / s / 1e9 for s in secs)),
                                  (n_rows, n_cols))
        del w
    return out


def with_kernel_matvec(gpus: list[GpuInfo], repeats: int) -> list[GpuInfo]:
    """The first GPU (the one numba.cuda uses) with its kernel matvec figures, or the reason."""
    import dataclasses

    if not gpus:
        return gpus
    try:
        mv, reason = kernel_matvec(repeats), ""
    except CudaUnavailable as e:
        mv, reason = None, str(e)
    except Exception as e:  # a kernel that fails to build must not lose the rest of the profile
        mv, reason = None, f"prima_ref GPU kernels failed: {type(e).__name__}: {e}"
    return [dataclasses.replace(gpus[0], matvec=mv, matvec_reason=reason)] + gpus[1:]


if __name__ == "__main__":  # python -m profiler.gpu: a quick look without the rest
    try:
        for g in with_kernel_matvec(probe_gpus(None, 3), 3):
            print(g.index, g.name, f"{g.vram_free_gib:.1f}/{g.vram_total_gib:.1f} GiB free",
                  f"{g.bandwidth_gbps.fmt(0)} GB/s")
            for q, m in (g.matvec or {}).items():
                print(f"  matvec {q}: {m.gbps.fmt(0)} GB/s {m.shape}")
            if g.matvec is None:
                print(f"  no kernel figures: {g.matvec_reason}")
    except CudaUnavailable as e:
        print(f"no GPU: {e}")
