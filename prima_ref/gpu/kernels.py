"""CUDA kernels (numba.cuda) for one transformer layer.

Products read raw GGUF blocks (uint8, uploaded once) and quantize the activations on the GPU
exactly as the CPU kernels do (prima_ref.quants.simd: llama.cpp's Q8_0/Q8_1/Q8_K), so the
integer parts of every dot product are the CPU's; only float summation order differs.

Every kernel here also runs under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1): no warp
shuffles, no libdevice, no bit casts. f16 values are read through a 65536-entry table and
written through `f16_bits`, a float64 rounding that is exact for every float32.

Work split of the products: one thread block per output row (PRODUCT_THREADS threads, each
taking 32-weight items strided by the block size) and TOKEN_TILE tokens per block; a
shared-memory tree sums the partials.
"""

from __future__ import annotations

import math

import numpy as np

if not hasattr(np, "row_stack"):  # numpy 2.5 removed it; numba-cuda 0.30 still overloads it
    np.row_stack = np.vstack

from numba import cuda, float32, float64, int32, int64  # noqa: E402

QK = 32  # weights per legacy block and per product item
QK_K = 256  # weights per K-quant super-block
PRODUCT_THREADS = 64
TOKEN_TILE = 4
NORM_THREADS = 128
ATTN_THREADS = 128
MAX_HEAD_DIM = 512
ATTN_ACC = MAX_HEAD_DIM // ATTN_THREADS  # float64 output accumulators per attention thread
EW_THREADS = 256  # element-wise kernels

# ggml type numbers (gguf.constants.GGMLQuantizationType)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K = 0, 1, 2, 3, 6, 7, 8, 12, 14
LEGACY = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
K_QUANTS = (Q4_K, Q6_K)
QUANTIZED = LEGACY + K_QUANTS
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q8_0: 34, Q4_K: 144, Q6_K: 210}
BLOCK_WEIGHTS = {Q4_0: QK, Q4_1: QK, Q5_0: QK, Q5_1: QK, Q8_0: QK, Q4_K: QK_K, Q6_K: QK_K}


def f16_table() -> np.ndarray:
    """float32 (65536,): the value of every f16 bit pattern."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


# --- scalar helpers -----------------------------------------------------------------------------


@cuda.jit(device=True)
def rint64(v):
    """v (float64) rounded to the nearest integer, ties to even (np.rint)."""
    r = math.floor(v + 0.5)
    if r - v == 0.5 and (int(r) & 1) != 0:
        r -= 1.0
    return r


@cuda.jit(device=True)
def f16_bits(v):
    """The f16 bit pattern nearest to float32 v (ties to even; >= 65520 gives inf)."""
    a = abs(float64(v))
    sign = 0x8000 if v < 0 else 0
    if a != a:
        return 0x7E00
    if a >= 65520.0:
        return sign | 0x7C00
    if a < 6.103515625e-05:  # below 2**-14: subnormal, steps of 2**-24
        return sign | int(rint64(a * 16777216.0))
    e = 0  # a = m * 2**e with 0.5 <= m < 1 (exact: scaling by 2)
    m = a
    while m >= 1.0:
        m *= 0.5
        e += 1
    while m < 0.5:
        m *= 2.0
        e -= 1
    r = rint64(m * 2048.0)  # 11 significant bits
    if r == 2048.0:
        r = 1024.0
        e += 1
    return sign | ((e + 14) << 10) | (int(r) - 1024)


@cuda.jit(device=True)
def round_f16(v, lut):
    return lut[f16_bits(v)]


@cuda.jit(device=True)
def f16_at(w, o, lut):
    return lut[int32(w[o]) | (int32(w[o + 1]) << 8)]


@cuda.jit(device=True)
def u32_at(w, o):
    # int64 throughout: numba unifies int64 with uint64 (what int(uint8) << n gives) as float64
    return (int64(w[o]) | (int64(w[o + 1]) << 8) | (int64(w[o + 2]) << 16)
            | (int64(w[o + 3]) << 24))


@cuda.jit(device=True)
def i8_at(w, o):
    v = int32(w[o])
    return v - 256 if v > 127 else v


# --- activation quantization (llama.cpp's quantize_row_q8_0 / q8_1 / q8_K) ---------------------


@cuda.jit
def quantize_q8_kernel(x, qx, dx, dsx, lut):
    """x (n_tok, n) -> qx int8 (n_tok, n), dx f16-rounded amax/127 (n_tok, n/32), dsx Q8_1's
    f16(d * sum(qx)) (n_tok, n/32). One thread per block of 32."""
    t = cuda.blockIdx.y
    b = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if b >= dx.shape[1]:
        return
    lo = b * QK
    amax = float32(0.0)
    for j in range(QK):
        amax = max(amax, abs(x[t, lo + j]))
    d = amax / float32(127.0)
    inv = float32(127.0) / amax if amax != 0 else float32(0.0)
    total = 0
    for j in range(QK):
        q = int(rint64(float64(x[t, lo + j] * inv)))
        qx[t, lo + j] = q
        total += q
    dx[t, b] = round_f16(d, lut)
    dsx[t, b] = round_f16(d * float32(total), lut)


@cuda.jit
def quantize_q8k_kernel(x, qx, xd):
    """quantize_row_q8_K_ref: per 256 values iscale = -127 / (the first x of largest |x|),
    q = min(127, rint(iscale * x)), d = 1 / iscale; xd (n_tok, n/32) holds d once per 32."""
    t = cuda.blockIdx.y
    b = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if b * 8 >= xd.shape[1]:
        return
    lo = b * QK_K
    amax = float32(0.0)
    xmax = float32(0.0)
    for j in range(QK_K):
        ax = abs(x[t, lo + j])
        if ax > amax:
            amax = ax
            xmax = x[t, lo + j]
    iscale = float32(-127.0) / xmax if amax != 0 else float32(0.0)
    d = float32(1.0) / iscale if iscale != 0 else float32(0.0)
    for j in range(QK_K):
        qx[t, lo + j] = min(127, int(rint64(float64(iscale * x[t, lo + j]))))
    for s in range(8):
        xd[t, b * 8 + s] = d


# --- quantized products -------------------------------------------------------------------------


@cuda.jit(device=True)
def _legacy_bytes(kind):
    if kind == Q8_0:
        return 34
    if kind == Q4_0:
        return 18
    if kind == Q4_1:
        return 20
    if kind == Q5_0:
        return 22
    return 24


@cuda.jit(device=True)
def _legacy_item(kind, w, base, b, qx, xd, xoff, t, lut):
    """Block b of a legacy row times token t's Q8 block b."""
    o = base + b * _legacy_bytes(kind)
    d = f16_at(w, o, lut)
    x0 = b * QK
    dot = 0
    if kind == Q8_0:
        for j in range(QK):
            dot += i8_at(w, o + 2 + j) * int32(qx[t, x0 + j])
        return float32(dot) * (d * xd[t, b])
    m = float32(0.0)
    qh = int64(0)
    qs = o + 2
    if kind == Q4_1 or kind == Q5_1:
        m = f16_at(w, o + 2, lut)
        qs = o + 4
    if kind == Q5_0 or kind == Q5_1:
        qh = u32_at(w, qs)
        qs += 4
    offset = 0
    if kind == Q4_0:
        offset = 8
    elif kind == Q5_0:
        offset = 16
    for j in range(16):
        byte = int32(w[qs + j])
        lo = byte & 15
        hi = byte >> 4
        if kind == Q5_0 or kind == Q5_1:
            lo |= ((qh >> j) & 1) << 4
            hi |= ((qh >> (j + 16)) & 1) << 4
        dot += (lo - offset) * int32(qx[t, x0 + j]) + (hi - offset) * int32(qx[t, x0 + 16 + j])
    y = float32(dot) * (d * xd[t, b])
    if kind == Q4_1 or kind == Q5_1:
        y += m * xoff[t, b]
    return y


@cuda.jit(device=True)
def _scale_min_k4(w, sc, j):
    """(scale, min) of sub-block j from Q4_K's 12 packed bytes at sc."""
    if j < 4:
        return int32(w[sc + j]) & 63, int32(w[sc + j + 4]) & 63
    s = (int32(w[sc + j + 4]) & 15) | ((int32(w[sc + j - 4]) >> 6) << 4)
    m = (int32(w[sc + j + 4]) >> 4) | ((int32(w[sc + j]) >> 6) << 4)
    return s, m


@cuda.jit(device=True)
def _k_item(kind, w, base, item, qx, xd, t, lut):
    """Sub-block item (32 weights) of a K-quant row times token t's Q8_K values there."""
    sb = item // 8
    j = item % 8
    x0 = item * QK
    xdv = xd[t, item]
    if kind == Q4_K:
        o = base + sb * 144
        d = f16_at(w, o, lut)
        dmin = f16_at(w, o + 2, lut)
        s, m = _scale_min_k4(w, o + 4, j)
        qs = o + 16 + 32 * (j // 2)
        shift = 4 * (j % 2)
        sumq = 0
        sumx = 0
        for l in range(QK):
            xv = int32(qx[t, x0 + l])
            sumq += ((int32(w[qs + l]) >> shift) & 15) * xv
            sumx += xv
        return (d * xdv) * float32(s * sumq) - (dmin * xdv) * float32(m * sumx)
    # Q6_K: ql[128], qh[64], scales int8[16], d
    o = base + sb * 210
    h = j // 4
    qq = j % 4
    ql = o + 64 * h + 32 * (qq % 2)
    nib = 4 * (qq // 2)
    qh = o + 128 + 32 * h
    sc = o + 192 + 8 * h + 2 * qq
    isum = 0
    for l in range(QK):
        q = ((int32(w[ql + l]) >> nib) & 15) | (((int32(w[qh + l]) >> (2 * qq)) & 3) << 4)
        isum += i8_at(w, sc + l // 16) * (q - 32) * int32(qx[t, x0 + l])
    return (f16_at(w, o + 208, lut) * xdv) * float32(isum)


@cuda.jit(device=True)
def _reduce_store(acc, r, t0, ys):
    """Sum each token's PRODUCT_THREADS partials in shared memory; write ys[t0 + k, r]."""
    tid = cuda.threadIdx.x
    sh = cuda.shared.array((TOKEN_TILE, PRODUCT_THREADS), float32)
    for k in range(TOKEN_TILE):
        sh[k, tid] = acc[k]
    cuda.syncthreads()
    step = PRODUCT_THREADS // 2
    while step > 0:
        if tid < step:
            for k in range(TOKEN_TILE):
                sh[k, tid] += sh[k, tid + step]
        cuda.syncthreads()
        step //= 2
    if tid < TOKEN_TILE and t0 + tid < ys.shape[0]:
        ys[t0 + tid, r] = sh[tid, 0]


def _make_products(kind):
    """The product kernel of one quant type: kind is a constant, so its branches fold away."""

    @cuda.jit
    def products(w, row_bytes, qx, xd, xoff, lut, ys):
        """ys (n_tok, n_rows) = x @ W.T over raw blocks w (n_rows * row_bytes,) uint8; qx
        int8 (n_tok, n_cols), xd (n_tok, n_cols/32) the activation scale of each 32, xoff
        Q8_1's s (types with a min). Grid (n_rows, ceil(n_tok / TOKEN_TILE))."""
        r = cuda.blockIdx.x
        t0 = cuda.blockIdx.y * TOKEN_TILE
        tid = cuda.threadIdx.x
        n_tok = ys.shape[0]
        base = r * row_bytes
        acc = cuda.local.array(TOKEN_TILE, float32)
        for k in range(TOKEN_TILE):
            acc[k] = 0.0
        for item in range(tid, qx.shape[1] // QK, PRODUCT_THREADS):
            for k in range(TOKEN_TILE):
                t = t0 + k
                if t < n_tok:
                    if kind == Q4_K or kind == Q6_K:
                        acc[k] += _k_item(kind, w, base, item, qx, xd, t, lut)
                    else:
                        acc[k] += _legacy_item(kind, w, base, item, qx, xd, xoff, t, lut)
        _reduce_store(acc, r, t0, ys)

    return products


PRODUCTS_BY_ITEM = {kind: _make_products(kind) for kind in QUANTIZED}


# --- coalesced products: lane j of a 32-thread group takes weight j of each 32-weight item -----
# A warp then reads 32 consecutive weight bytes (or 16, nibbles) and 32 consecutive int8 of x
# per step instead of one byte of 32 different blocks, which made the item kernels above
# bound by L1 transactions. Each weight * x product is an exact integer, scaled in float32.


@cuda.jit(device=True)
def _legacy_elem(kind, w, base, b, j, qx, xd, xoff, t, lut):
    """Weight j of block b times x, as float32; lane 0 also adds the block's min term."""
    o = base + b * _legacy_bytes(kind)
    xv = int32(qx[t, b * QK + j])
    scale = f16_at(w, o, lut) * xd[t, b]
    if kind == Q8_0:
        return scale * float32(i8_at(w, o + 2 + j) * xv)
    qs = o + 2
    if kind == Q4_1 or kind == Q5_1:
        qs = o + 4
    qh = qs
    if kind == Q5_0 or kind == Q5_1:
        qs += 4
    byte = int32(w[qs + (j & 15)])
    u = (byte & 15) if j < 16 else (byte >> 4)
    if kind == Q5_0 or kind == Q5_1:
        u |= ((int32(w[qh + j // 8]) >> (j % 8)) & 1) << 4
    if kind == Q4_0:
        u -= 8
    elif kind == Q5_0:
        u -= 16
    y = scale * float32(u * xv)
    if (kind == Q4_1 or kind == Q5_1) and j == 0:
        y += f16_at(w, o + 2, lut) * xoff[t, b]
    return y


@cuda.jit(device=True)
def _k_elem(kind, w, base, item, l, qx, xd, t, lut):
    """Weight l of sub-block item (32 weights) of a K-quant row times x, as float32."""
    sb = item // 8
    j = item % 8
    xv = int32(qx[t, item * QK + l])
    xdv = xd[t, item]
    if kind == Q4_K:
        o = base + sb * 144
        s, m = _scale_min_k4(w, o + 4, j)
        q = (int32(w[o + 16 + 32 * (j // 2) + l]) >> (4 * (j % 2))) & 15
        return ((f16_at(w, o, lut) * xdv) * float32(s * q * xv)
                - (f16_at(w, o + 2, lut) * xdv) * float32(m * xv))
    o = base + sb * 210
    h = j // 4
    qq = j % 4
    q = ((int32(w[o + 64 * h + 32 * (qq % 2) + l]) >> (4 * (qq // 2))) & 15) \
        | (((int32(w[o + 128 + 32 * h + l]) >> (2 * qq)) & 3) << 4)
    sc = i8_at(w, o + 192 + 8 * h + 2 * qq + l // 16)
    return (f16_at(w, o + 208, lut) * xdv) * float32(sc * (q - 32) * xv)


def _make_products_coalesced(kind):
    @cuda.jit
    def products(w, row_bytes, qx, xd, xoff, lut, ys):
        """As PRODUCTS_BY_ITEM[kind]; PRODUCT_THREADS / 32 groups stride over the items."""
        r = cuda.blockIdx.x
        t0 = cuda.blockIdx.y * TOKEN_TILE
        tid = cuda.threadIdx.x
        lane = tid % QK
        group = tid // QK
        n_tok = ys.shape[0]
        base = r * row_bytes
        acc = cuda.local.array(TOKEN_TILE, float32)
        for k in range(TOKEN_TILE):
            acc[k] = 0.0
        for item in range(group, qx.shape[1] // QK, PRODUCT_THREADS // QK):
            for k in range(TOKEN_TILE):
                t = t0 + k
                if t < n_tok:
                    if kind == Q4_K or kind == Q6_K:
                        acc[k] += _k_elem(kind, w, base, item, lane, qx, xd, t, lut)
                    else:
                        acc[k] += _legacy_elem(kind, w, base, item, lane, qx, xd, xoff, t, lut)
        _reduce_store(acc, r, t0, ys)

    return products


PRODUCTS = {kind: _make_products_coalesced(kind) for kind in QUANTIZED}


@cuda.jit
def f32_products_kernel(w, x, ys):
    """ys (n_tok, n_rows) = x @ W.T, W float32 (n_rows, n_cols), in float32."""
    r = cuda.blockIdx.x
    t0 = cuda.blockIdx.y * TOKEN_TILE
    tid = cuda.threadIdx.x
    acc = cuda.local.array(TOKEN_TILE, float32)
    for k in range(TOKEN_TILE):
        acc[k] = 0.0
        t = t0 + k
        if t < ys.shape[0]:
            for i in range(tid, x.shape[1], PRODUCT_THREADS):
                acc[k] += w[r, i] * x[t, i]
    _reduce_store(acc, r, t0, ys)


@cuda.jit
def f16_products_kernel(w, x, lut, ys):
    """W f16 bits (n_rows, n_cols) uint16; x rounded to f16 first, as ggml's vec_dot_f16."""
    r = cuda.blockIdx.x
    t0 = cuda.blockIdx.y * TOKEN_TILE
    tid = cuda.threadIdx.x
    acc = cuda.local.array(TOKEN_TILE, float32)
    for k in range(TOKEN_TILE):
        acc[k] = 0.0
        t = t0 + k
        if t < ys.shape[0]:
            for i in range(tid, x.shape[1], PRODUCT_THREADS):
                acc[k] += lut[w[r, i]] * round_f16(x[t, i], lut)
    _reduce_store(acc, r, t0, ys)


# --- the layer's other ops -------------------------------------------------------------------


@cuda.jit
def rms_norm_kernel(x, weight, eps, out):
    """out = x / rms(x) * weight per row. Thread 0 sums the float32 squares in float64 in the
    CPU kernel's order (ggml_float), so the result is the CPU's bit for bit: a norm's output
    is quantized next, and a last-bit difference could flip an int8 rounding."""
    r = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    n = x.shape[1]
    sh = cuda.shared.array(1, float32)
    if tid == 0:
        acc = 0.0
        for i in range(n):
            sq = x[r, i] * x[r, i]
            acc += float64(sq)
        mean = float32(acc / n)
        sh[0] = float32(1.0) / math.sqrt(mean + eps)
    cuda.syncthreads()
    scale = sh[0]
    for i in range(tid, n, NORM_THREADS):
        out[r, i] = (x[r, i] * scale) * weight[i]


@cuda.jit
def add_kernel(a, b, out):
    """out = a + b, all (n_tok, n)."""
    i = cuda.grid(1)
    if i < a.size:
        r = i // a.shape[1]
        c = i % a.shape[1]
        out[r, c] = a[r, c] + b[r, c]


@cuda.jit
def add_bias_kernel(y, bias):
    """y (n_tok, n) += bias (n,)."""
    i = cuda.grid(1)
    if i < y.size:
        c = i % y.shape[1]
        y[i // y.shape[1], c] += bias[c]


@cuda.jit
def rope_kernel(x, positions, n_rot, theta_scale, freq_scale, neox):
    """Rotate the first n_rot dims of every head of x (n_tok, n_head, head_dim) in place; the
    angle advances by repeated float32 multiplication, as ggml's rope."""
    idx = cuda.grid(1)
    n_head = x.shape[1]
    half = n_rot // 2
    if idx >= x.shape[0] * n_head * half:
        return
    i = idx % half
    h = (idx // half) % n_head
    t = idx // (half * n_head)
    theta = float32(positions[t])
    for _ in range(i):
        theta = theta * theta_scale
    angle = freq_scale * theta
    c = float32(math.cos(float64(angle)))
    s = float32(math.sin(float64(angle)))
    if neox:
        a = i
        b = i + half
    else:
        a = 2 * i
        b = 2 * i + 1
    x0 = x[t, h, a]
    x1 = x[t, h, b]
    x[t, h, a] = x0 * c - x1 * s
    x[t, h, b] = x0 * s + x1 * c


@cuda.jit
def kv_store_kernel(k, v, positions, k_cache, v_cache, lut):
    """Cache slot positions[t] <- k[t], v[t] rounded to f16 precision (llama.cpp's f16 KV)."""
    idx = cuda.grid(1)
    n_kv, d = k.shape[1], k.shape[2]
    if idx >= k.shape[0] * n_kv * d:
        return
    i = idx % d
    h = (idx // d) % n_kv
    t = idx // (d * n_kv)
    p = positions[t]
    k_cache[p, h, i] = round_f16(k[t, h, i], lut)
    v_cache[p, h, i] = round_f16(v[t, h, i], lut)


@cuda.jit
def kv_clear_kernel(k_cache, v_cache, p0, p1):
    idx = cuda.grid(1)
    per = k_cache.shape[1] * k_cache.shape[2]
    if idx >= (p1 - p0) * per:
        return
    p = p0 + idx // per
    h = (idx % per) // k_cache.shape[2]
    i = idx % k_cache.shape[2]
    k_cache[p, h, i] = 0.0
    v_cache[p, h, i] = 0.0


@cuda.jit
def attention_kernel(q, k_cache, v_cache, positions, window, scale, softcap, out):
    """Causal GQA attention with an online softmax over tiles of ATTN_THREADS positions, one
    thread block per (token, head), float64 accumulators as the CPU kernel. q (n_tok, n_head,
    d); caches (n_ctx, n_head_kv, d), slot p holding position p; window > 0 keeps keys with
    pos - key_pos < window; softcap > 0 applies softcap * tanh(s / softcap)."""
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    d = q.shape[2]
    kv = h // (q.shape[1] // k_cache.shape[1])
    pos = positions[t]
    first = 0
    if window > 0:
        first = max(0, pos - window + 1)
    probs = cuda.shared.array(ATTN_THREADS, float64)
    red = cuda.shared.array(ATTN_THREADS, float64)
    acc = cuda.local.array(ATTN_ACC, float64)
    for k in range(ATTN_ACC):
        acc[k] = 0.0
    run_max = -math.inf
    run_sum = 0.0
    for start in range(first, pos + 1, ATTN_THREADS):
        j = start + tid
        s = -math.inf
        if j <= pos:
            s = 0.0
            for i in range(d):
                s += float64(q[t, h, i]) * float64(k_cache[j, kv, i])
            s *= scale
            if softcap > 0:
                s = softcap * math.tanh(s / softcap)
        red[tid] = s
        cuda.syncthreads()
        step = ATTN_THREADS // 2
        while step > 0:
            if tid < step:
                red[tid] = max(red[tid], red[tid + step])
            cuda.syncthreads()
            step //= 2
        new_max = max(run_max, red[0])
        correction = math.exp(run_max - new_max)
        cuda.syncthreads()
        p = 0.0
        if j <= pos:
            p = math.exp(s - new_max)
        probs[tid] = p
        red[tid] = p
        cuda.syncthreads()
        step = ATTN_THREADS // 2
        while step > 0:
            if tid < step:
                red[tid] += red[tid + step]
            cuda.syncthreads()
            step //= 2
        run_sum = run_sum * correction + red[0]
        n_valid = min(ATTN_THREADS, pos + 1 - start)
        for k in range(ATTN_ACC):
            i = tid + k * ATTN_THREADS
            if i < d:
                a = acc[k] * correction
                for jj in range(n_valid):
                    a += probs[jj] * float64(v_cache[start + jj, kv, i])
                acc[k] = a
        run_max = new_max
        cuda.syncthreads()
    for k in range(ATTN_ACC):
        i = tid + k * ATTN_THREADS
        if i < d:
            out[t, h, i] = float32(acc[k] / run_sum)


@cuda.jit
def silu_mul_kernel(gate, up):
    """gate <- silu(gate) * up, (n_tok, n_ff), float32."""
    i = cuda.grid(1)
    if i < gate.size:
        r = i // gate.shape[1]
        c = i % gate.shape[1]
        g = gate[r, c]
        gate[r, c] = g / (float32(1.0) + math.exp(-g)) * up[r, c]


@cuda.jit
def gelu_mul_kernel(gate, up, gelu_table, lut):
    """gate <- gelu(gate) * up through ggml's f16 GELU table (index: gate rounded to f16) and
    its clamps: 0 below -10, identity above 10."""
    i = cuda.grid(1)
    if i < gate.size:
        r = i // gate.shape[1]
        c = i % gate.shape[1]
        g = gate[r, c]
        if g <= -10.0:
            v = float32(0.0)
        elif g >= 10.0:
            v = g
        else:
            v = gelu_table[f16_bits(g)]
        gate[r, c] = v * up[r, c]
