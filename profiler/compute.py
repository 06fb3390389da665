"""What the CPU does per decoded token: stream weights through matvecs, read RAM, copy KV.

prima.cpp times one small n x n matrix-matrix product per type (n = 512 on CPU), which sits in
cache and reuses every weight n times; decode multiplies each weight once (a matrix-vector
product) and is bound by how fast weights stream from memory. So the matvec figure here runs
prima_ref's own kernels over the model's real tensors, mmapped from the file the runtime maps
(its repacked copy, prima_ref.repacked, where the CPU reads one), in decode order (layer 0's
tensors of that type, layer 1's, ..., then the output matrix), up to a byte cap. The working
set is then what decode really streams: for a model smaller than the last-level cache that is
the cache, for a big model it is RAM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from profiler.model import MatvecTensor
from profiler.stats import Stat, repeat, timed_passes

MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# RAM read bandwidth


@dataclass(frozen=True)
class RamBandwidth:
    all_threads_gbps: Stat
    one_thread_gbps: Stat
    buffer_mib: float
    threads: int


def ram_bandwidth(buffer_mib: int, threads: int, repeats: int) -> RamBandwidth:
    """Streaming read of a touched buffer (prima_ref.membw); each sample is the best of 3."""
    from prima_ref import membw

    buf = membw.make_buffer(buffer_mib * MIB)  # (n_words,) uint64
    multi = repeat(lambda: membw.read_bw_gbps(buf, threads, repeats=3), repeats)
    single = repeat(lambda: membw.read_bw_gbps(buf, 1, repeats=3), repeats)
    return RamBandwidth(multi, single, buffer_mib, threads)


# ---------------------------------------------------------------------------------------------
# Matvec throughput per quant type


@dataclass(frozen=True)
class MatvecResult:
    qtype: str
    gbps: Stat  # weight bytes per second
    gflops: Stat  # 2 * rows * cols per matvec, per second
    n_tensors: int
    working_set_bytes: int
    shapes: tuple[tuple[int, int], ...]  # distinct (rows, cols) timed
    warmup_s: float  # first pass: JIT load or compile, and paging the tensors in


def matvec_throughput(model_path, tensors: list[MatvecTensor], *, threads: int, repeats: int,
                      max_bytes: int, min_seconds: float) -> MatvecResult:
    """Time passes over `tensors` (one quant type) until each sample lasts min_seconds."""
    from prima_ref import repacked
    from prima_ref.model.transformer import weight
    from prima_ref.quants import set_num_threads

    chosen, total = [], 0
    for t in tensors:
        if chosen and total + t.n_bytes > max_bytes:
            break
        chosen.append(t)
        total += t.n_bytes
    qtype = chosen[0].qtype
    flops = sum(2 * t.n_rows * t.n_cols for t in chosen)
    rng = np.random.default_rng(0)
    set_num_threads(threads)
    # the file the engine maps: legacy matrices repacked where the CPU reads them so
    with repacked.open_model(model_path, *repacked.needs(t.name for t in chosen)) as gguf_model:
        weights = [weight(gguf_model, t.name) for t in chosen]  # views of the map
        xs = [rng.standard_normal((1, t.n_cols)).astype(np.float32) for t in chosen]  # (1, n_cols)

        def one_pass():
            for w, x in zip(weights, xs, strict=True):
                w(x)

        t0 = time.perf_counter()
        one_pass()
        warmup = time.perf_counter() - t0

        def seconds_per_pass() -> float:
            passes, seconds = timed_passes(one_pass, min_seconds)
            return seconds / passes

        per_pass = repeat(seconds_per_pass, repeats)
    return MatvecResult(qtype=qtype, gbps=per_pass.inverse(total / 1e9),
                        gflops=per_pass.inverse(flops / 1e9), n_tensors=len(chosen),
                        working_set_bytes=total,
                        shapes=tuple(sorted({(t.n_rows, t.n_cols) for t in chosen})),
                        warmup_s=warmup)


# ---------------------------------------------------------------------------------------------
# KV-cache copy: what decode does per layer after computing this token's K and V


def kv_copy_ms(n_head_kv: int, head_dim: int, n_layers: int, repeats: int,
               min_seconds: float) -> Stat:
    """ms to store one token's K and V into one layer's cache (prima_ref's KVCache.store).

    Up to 16 layers' caches of 1024 slots, written round-robin as decode does, so the
    destination is not always the same cache line.
    """
    from prima_ref.model.transformer import KVCache

    n_caches, n_slots = min(n_layers, 16), 1024
    caches = [KVCache(n_slots, n_head_kv, head_dim) for _ in range(n_caches)]
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, n_head_kv, head_dim)).astype(np.float32)  # (1, n_head_kv, d)
    v = rng.standard_normal((1, n_head_kv, head_dim)).astype(np.float32)
    slots = [np.array([p]) for p in range(n_slots)]
    pos = [0]

    def one_token():
        p = slots[pos[0] % n_slots]
        pos[0] += 1
        for cache in caches:
            cache.store(p, k, v)

    def ms_per_layer() -> float:
        passes, seconds = timed_passes(one_token, min_seconds)
        return seconds / (passes * n_caches) * 1e3

    one_token()
    return repeat(ms_per_layer, repeats)


def input_lookup_ms(model_path, repeats: int, min_seconds: float) -> Stat | None:
    """ms to dequantize one token's embedding row (prima.cpp's inp_embd_ms)."""
    from prima_ref.gguf_file import GGUFModel
    from prima_ref.quants import kernels

    with GGUFModel.open(model_path) as gguf_model:
        if "token_embd.weight" not in gguf_model.tensors:
            return None
        info = gguf_model.tensors["token_embd.weight"]
        rows = gguf_model.tensor_rows("token_embd.weight")  # (n_vocab, row_bytes)
        dequantize = kernels(info.qtype).dequantize
        ids = np.random.default_rng(0).integers(0, info.n_rows, 4096)
        i = [0]

        def one_lookup():
            row = int(ids[i[0] % ids.size])
            i[0] += 1
            dequantize(rows[row:row + 1])

        one_lookup()

        def ms() -> float:
            passes, seconds = timed_passes(one_lookup, min_seconds)
            return seconds / passes * 1e3

        return repeat(ms, repeats)
