"""RAM read bandwidth: how fast this machine can stream bytes it does not have in cache.

A decode step reads every weight once, so this figure bounds tokens/s; the kernel benchmark
reports matvec speed as a percentage of it and the profiler reuses it per device.

The probe sums 8-byte words with 8 independent accumulators (no carried latency chain, so the
loads are the limit), over an array many times larger than the last-level cache, split into
one contiguous chunk per thread. Best of a few runs: interference only ever slows a run down.
"""

from __future__ import annotations

import time

import numba
import numpy as np
from numba import njit, prange

LANES = 8  # independent accumulators: enough loads in flight to saturate the memory bus


@njit(cache=True, parallel=True)
def _sum_words(words, n_chunks):
    # words uint64 (n,), one contiguous chunk per parallel task; returns a checksum.
    # Unsigned index arithmetic: with signed range() indices Numba guards every load against
    # negative wraparound and the loop ran at 5 GB/s here (28 GB/s unsigned, 1 thread).
    n = words.shape[0]
    per_chunk = np.uint64(n // n_chunks // LANES * LANES)
    partial = np.zeros(n_chunks, np.uint64)  # (n_chunks,)
    for c in prange(n_chunks):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.uint64(0)
        base = np.uint64(c) * per_chunk
        for j in range(per_chunk // np.uint64(LANES)):
            i = base + np.uint64(j) * np.uint64(LANES)
            a0 += words[i]
            a1 += words[i + np.uint64(1)]
            a2 += words[i + np.uint64(2)]
            a3 += words[i + np.uint64(3)]
            a4 += words[i + np.uint64(4)]
            a5 += words[i + np.uint64(5)]
            a6 += words[i + np.uint64(6)]
            a7 += words[i + np.uint64(7)]
        partial[c] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7
    return partial.sum()


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def make_buffer(n_bytes: int) -> np.ndarray:
    """A touched (so really mapped) uint64 array of n_bytes, rounded down to 64 words."""
    n_words = n_bytes // 8 // 64 * 64
    return np.ones(n_words, np.uint64)  # (n_words,)


def read_bw_gbps(buf: np.ndarray, n_threads: int, repeats: int = 5) -> float:
    """GB/s (1e9 bytes/s) of a streaming read of buf on n_threads threads."""
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n_threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        chunks = numba.get_num_threads()
        _sum_words(buf[: 64 * LANES], chunks)  # compile outside the timing
        seconds = _best_seconds(lambda: _sum_words(buf, chunks), repeats)
    finally:
        numba.set_num_threads(old)
    return buf.nbytes / seconds / 1e9


def numpy_sum_gbps(buf: np.ndarray, repeats: int = 5) -> float:
    """numpy's a.sum() over the same bytes as float32, for comparison (one thread)."""
    as_f32 = buf.view(np.float32)
    return buf.nbytes / _best_seconds(as_f32.sum, repeats) / 1e9


def measure(n_bytes: int = 1 << 30, threads=(1, 2), repeats: int = 5) -> dict[str, float]:
    """{'1': GB/s, '2': GB/s, ..., 'numpy_sum': GB/s} over a buffer of n_bytes."""
    buf = make_buffer(n_bytes)
    result = {str(t): read_bw_gbps(buf, t, repeats) for t in threads}
    result["numpy_sum"] = numpy_sum_gbps(buf, repeats)
    return result


if __name__ == "__main__":
    import prima_ref  # noqa: F401  (codegen flags; harmless if numba came first)

    for key, gbps in measure().items():
        print(f"read bandwidth {key:>9}: {gbps:6.1f} GB/s")
