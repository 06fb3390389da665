"""Decode products with the weight ROWS in the vector lanes: 16 rows x 1..8 tokens per pass.

A decode step multiplies each matrix by one vector per server slot. The row-at-a-time kernels
(``legacy``'s row dot) keep a row's 32 weights in the lanes: every block of every token then
pays its own convert, scale and FMA, and a row's partial sums need a horizontal sum, so n
tokens cost nearly n times one. Here lane r of a 512-bit vpdpbusd holds 4 quants of row r (as
``tiled``'s prefill tiles do) and x's 4 matching int8 values are broadcast from memory: after
a block's dots each lane holds its row's whole integer block dot, and a block costs one
convert and one FMA per 16 rows and token.

Where ``tiled`` gathers each 4-byte group of 16 rows (a vpgatherdd per group, worth it when
the tile then serves 8 tokens and more), these kernels load each row's 16 quant bytes whole
and transpose 16 rows x 4 dwords in registers (shuffles), gathering only the f16 scales; the
weights go from the mapped file straight to the dots, no scratch. The token count n is a
compile-time constant (one kernel per n in 1..8), so n accumulators stay in registers.

Integers, scales and float order are ``tiled``'s: per block d_r * dx_t, one FMA of the
converted integer dot (seeded with -k * sum(qx) for the types without a min), then m_r * s_t
for the types with one, blocks in order. So ys is bit-identical to ``tiled.matmul`` on the
same activations, whatever n.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from prima_ref.model.ops import rms_norm
from prima_ref.quants.layouts import QK_LEGACY as QK
from prima_ref.quants.simd import _quantize_rows_q8
from prima_ref.quants.tiled import (
    _F32,
    _I8,
    _I32,
    _I64,
    _V16F32,
    _V16I32,
    BLOCK_BYTES,
    GROUPS,
    HAS_MIN,
    HAS_QH,
    K_SHIFT,
    KINDS,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    QH_OFF,
    QS_OFF,
    ROWS,
    _call,
    _const16,
    _data,
    _gather,
    _half_to_f32,
    _splat,
    available,  # noqa: F401  (lanes.available(): the same CPU test)
    block_fma,
)

MAX_TOKENS = 8
# software prefetch of the group PREFETCH_GROUPS ahead, into L2 (llvm.prefetch locality 1:
# prefetcht2); measured on 576- to 8192-wide Q8_0/Q4_0 matrices from L3 and RAM, 1 and 2
# threads: into L1 (prefetcht0) up to 2x slower on wide rows, 1 or 4 groups no better
PREFETCH_LOCALITY = 1
PREFETCH_GROUPS = 2
_V4I32 = ir.VectorType(_I32, 4)
_ZERO_F, _ZERO_I = ir.Constant(_V16F32, None), ir.Constant(_V16I32, None)


def _shuffle(b, x, y, idx):
    return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(_I32, len(idx)),
                                              [int(i) for i in idx]))


def _transpose(b, quads):
    """16 rows' 4-dword vectors (quads[r]) -> 4 vectors of 16 lanes: out[i][r] = quads[r][i]."""
    pairs = [_shuffle(b, quads[2 * k], quads[2 * k + 1], range(8)) for k in range(8)]
    fours = [_shuffle(b, pairs[2 * k], pairs[2 * k + 1], range(16)) for k in range(4)]
    # fours[k] lane 4j + i: row 4k + j, dword i
    out = []
    for i in range(4):
        lo = _shuffle(b, fours[0], fours[1], [i, 4 + i, 8 + i, 12 + i,
                                              16 + i, 20 + i, 24 + i, 28 + i] + [0] * 8)
        hi = _shuffle(b, fours[2], fours[3], [i, 4 + i, 8 + i, 12 + i,
                                              16 + i, 20 + i, 24 + i, 28 + i] + [0] * 8)
        out.append(_shuffle(b, lo, hi, list(range(8)) + list(range(16, 24))))
    return out


def _rows(kind: int, n_tok: int):
    """Code of rows(kind, n, raw, off, row_bytes, n_valid, n_blocks, qxb, dxb, nsxb, dsxb,
    padded, ys, y_off, y_stride, n_store): for the 16 rows from byte off (row r at off + r *
    row_bytes; rows >= n_valid repeat row n_valid - 1, their lanes not stored) and tokens
    0..n-1 of the block-major activations, ys[y_off + t * y_stride + r] = sum over blocks of
    d_r dx_t (u_r . qx_t + (-sx_t << k)) (+ m_r s_t with a min), for t < n_store."""
    bb, qs_off, qh_off = BLOCK_BYTES[kind], QS_OFF[kind], QH_OFF[kind]
    has_min, has_qh = HAS_MIN[kind], HAS_QH[kind]

    def codegen(context, builder, sig, args):
        b = builder
        i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
        rawp = _data(context, b, sig.args[0], args[0], _I8)
        qp = _data(context, b, sig.args[5], args[5], _I32)
        dxp = _data(context, b, sig.args[6], args[6], _F32)
        sp = _data(context, b, sig.args[7], args[7], _I32)
        dsp = _data(context, b, sig.args[8], args[8], _F32)
        yp = _data(context, b, sig.args[10], args[10], _F32)
        off, rb, nv, nb, padded, yo, ys, n_store = (
            context.cast(b, args[i], sig.args[i], types.int64) for i in (1, 2, 3, 4, 9, 11, 12, 13))
        last = b.sub(nv, i64(1))
        starts = []
        for r in range(ROWS):
            rr = b.select(b.icmp_signed("<", i64(r), nv), i64(r), last)
            starts.append(b.gep(rawp, [b.add(off, b.mul(rr, rb))]))
        lanes = _const16(range(ROWS))
        clamped = b.select(b.icmp_signed("<", lanes, _splat(b, b.trunc(nv, _I32), _V16I32)),
                           lanes, _splat(b, b.trunc(last, _I32), _V16I32))
        idx = b.mul(_splat(b, b.trunc(rb, _I32), _V16I32), clamped)
        ones = ir.Constant(ir.VectorType(ir.IntType(1), 16), [1] * 16)
        fma = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(_V16F32, [_V16F32] * 3), "llvm.fma.v16f32")
        c = lambda v: _const16([v] * 16)  # noqa: E731

        pre = b.block
        loop, done = b.append_basic_block("lanes.loop"), b.append_basic_block("lanes.done")
        b.cbranch(b.icmp_signed(">", nb, i64(0)), loop, done)
        b.position_at_end(loop)
        blk = b.phi(_I64)
        accs = [b.phi(_V16F32) for _ in range(n_tok)]
        boff = b.mul(blk, i64(bb))

        def quads(k):  # each row's dwords k..k+3 of the block's quants, transposed
            qs = []
            for r in range(ROWS):
                p = b.gep(starts[r], [b.add(boff, i64(qs_off + 16 * k))])
                qs.append(b.load(b.bitcast(p, _V4I32.as_pointer()), align=1))
            return _transpose(b, qs)

        # the rows of one group are 16 * row_bytes contiguous bytes, read as 16 strided
        # streams at a time, which the hardware prefetchers follow poorly (short rows: not at
        # all): fetch the group PREFETCH_GROUPS ahead at the same pace (16 * bb bytes a block)
        ahead = b.add(b.add(off, b.mul(rb, i64(ROWS * PREFETCH_GROUPS))),
                      b.mul(blk, i64(ROWS * bb)))
        for j in range(0, ROWS * bb, 64):
            pf = b.gep(rawp, [b.add(ahead, i64(j))])
            _call(b, "llvm.prefetch.p0i8", ir.VoidType(),
                  [pf, ir.Constant(_I32, 0), ir.Constant(_I32, PREFETCH_LOCALITY),
                   ir.Constant(_I32, 1)])
        head = _gather(b, b.gep(rawp, [b.add(off, boff)]), idx, ones)
        dv = _half_to_f32(b, head)
        mv = _half_to_f32(b, b.lshr(head, c(16))) if has_min else None
        if kind == Q8_0:
            wv = [b.xor(q, c(0x80808080)) for q in quads(0) + quads(1)]
        else:
            q4 = quads(0)
            wv = [b.and_(q, c(0x0F0F0F0F)) for q in q4] + \
                 [b.and_(b.lshr(q, c(4)), c(0x0F0F0F0F)) for q in q4]
            if has_qh:  # bit j of qh: 5th bit of weight j, to bit 4 of its byte
                qh = _gather(b, b.gep(rawp, [b.add(off, b.add(boff, i64(qh_off)))]), idx, ones)
                for i in range(GROUPS):
                    four = b.and_(b.lshr(qh, c(4 * i)), c(0xF))
                    spread = b.mul(four, c(0x02040810))
                    wv[i] = b.or_(wv[i], b.and_(spread, c(0x10101010)))
        new = []
        for t, acc in enumerate(accs):
            slot = b.add(b.mul(blk, padded), i64(t))
            seed = None
            if not has_min:  # -k * sum(qx): the tiles' seed, from -sum(qx)
                nsx = _splat(b, b.load(b.gep(sp, [slot]), align=4), _V16I32)
                seed = b.shl(nsx, c(K_SHIFT[kind]))
            new.append(block_fma(b, fma, wv, dv, mv, seed, qp, dxp, dsp, slot, acc))
        nxt = b.add(blk, i64(1))
        end = b.block
        blk.add_incoming(i64(0), pre)
        blk.add_incoming(nxt, end)
        for acc, value in zip(accs, new, strict=True):
            acc.add_incoming(_ZERO_F, pre)
            acc.add_incoming(value, end)
        b.cbranch(b.icmp_signed("<", nxt, nb), loop, done)
        b.position_at_end(done)
        phis = [b.phi(_V16F32) for _ in new]
        store = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(ir.VoidType(), [_V16F32, _V16F32.as_pointer(), _I32,
                                                      ir.VectorType(ir.IntType(1), 16)]),
            "llvm.masked.store.v16f32.p0v16f32")
        valid = b.icmp_signed("<", lanes, _splat(b, b.trunc(nv, _I32), _V16I32))
        none = ir.Constant(valid.type, None)
        for t, (phi, value) in enumerate(zip(phis, new, strict=True)):
            phi.add_incoming(_ZERO_F, pre)
            phi.add_incoming(value, end)
            p = b.gep(yp, [b.add(yo, b.mul(ys, i64(t)))])
            mask = b.select(b.icmp_signed("<", i64(t), n_store), valid, none)  # padding: none
            b.call(store, [phi, b.bitcast(p, _V16F32.as_pointer()), ir.Constant(_I32, 4), mask])
        return context.get_dummy_value()

    return codegen


@intrinsic
def rows16(typingctx, kind, n_tok, raw, off, row_bytes, n_valid, n_blocks, qxb, dxb, nsxb,
           dsxb, padded, ys, y_off, y_stride, n_store):
    for name, lit, allowed in (("kind", kind, KINDS), ("n_tok", n_tok,
                                                        range(1, MAX_TOKENS + 1))):
        if not isinstance(lit, types.IntegerLiteral):
            raise errors.RequireLiteralValue(f"rows16: {name} must be a constant")
        if lit.literal_value not in allowed:
            raise errors.TypingError(f"rows16: no kernel for {name}={lit.literal_value}")
    emit = _rows(kind.literal_value, n_tok.literal_value)

    def codegen(context, builder, sig, llargs):
        return emit(context, builder, types.none(*sig.args[2:]), llargs[2:])

    return types.none(kind, n_tok, raw, off, row_bytes, n_valid, n_blocks, qxb, dxb, nsxb,
                      dsxb, padded, ys, y_off, y_stride, n_store), codegen


# --- helpers the decode entry points (fused, batched, legacy's matvec) share --------------------


@njit(cache=True, inline="always")
def prepare(xs, norm_w, eps, padded):
    """xs (n, n_in), optionally RMS-normed row by row, quantized as legacy's Q8_0 / Q8_1
    activations and laid out block-major for ``padded`` >= n tokens (zeros past n): qxb int8
    (n_blocks * padded * 32,), dxb, nsxb (-sum of the block's qx, int32), dsxb."""
    n, n_in = xs.shape
    h = xs
    if norm_w.shape[0]:
        h = np.empty((n, n_in), np.float32)
        rms_norm(xs, norm_w, eps, h)
    nb = n_in // QK
    qx = np.empty((n, n_in), np.int8)
    dx = np.empty((n, nb), np.float32)
    sx = np.empty((n, nb), np.int32)
    dsx = np.empty((n, nb), np.float32)
    _quantize_rows_q8(h, qx, dx, sx, dsx)
    if padded == 1:  # one token: block-major is row-major, only -sx to write
        nsx = np.empty(nb, np.int32)
        for blk in range(nb):
            nsx[blk] = -sx[0, blk]
        return qx.reshape(-1), dx.reshape(-1), nsx, dsx.reshape(-1)
    # plain loops: in a parallel caller an array expression or a slice copy would each be a
    # parallel region of its own (a fork/join per block)
    qxb = np.empty(nb * padded * QK, np.int8)
    dxb = np.empty(nb * padded, np.float32)
    nsxb = np.empty(nb * padded, np.int32)
    dsxb = np.empty(nb * padded, np.float32)
    for blk in range(nb):
        for t in range(padded):
            i = blk * padded + t
            real = t < n
            for j in range(QK):
                qxb[i * QK + j] = qx[t, blk * QK + j] if real else 0
            dxb[i] = dx[t, blk] if real else np.float32(0)
            nsxb[i] = -sx[t, blk] if real else 0
            dsxb[i] = dsx[t, blk] if real else np.float32(0)
    return qxb, dxb, nsxb, dsxb


def padded_tokens(n: int) -> int:
    """The kernel's token count for n rows: 1, 2, 4 or 8 (fewer kernels to compile; the
    padding tokens are zeros whose results are dropped, and every token's lanes are
    independent, so the padding changes no bit)."""
    return 1 if n <= 1 else 2 if n == 2 else 4 if n <= 4 else 8


@njit(cache=True, inline="always")
def rows_n(kind, n, n_pad, flat, off, rb, nv, nb, qxb, dxb, nsxb, dsxb, ys, yo, ystride):
    """rows16 for a constant kind, n tokens stored of n_pad (1, 2, 4 or 8) computed."""
    if n_pad == 1:
        rows16(kind, 1, flat, off, rb, nv, nb, qxb, dxb, nsxb, dsxb, 1, ys, yo, ystride, n)
    elif n_pad == 2:
        rows16(kind, 2, flat, off, rb, nv, nb, qxb, dxb, nsxb, dsxb, 2, ys, yo, ystride, n)
    elif n_pad == 4:
        rows16(kind, 4, flat, off, rb, nv, nb, qxb, dxb, nsxb, dsxb, 4, ys, yo, ystride, n)
    else:
        rows16(kind, 8, flat, off, rb, nv, nb, qxb, dxb, nsxb, dsxb, 8, ys, yo, ystride, n)


@njit(cache=True, inline="always")
def rows_one(kind, flat, off, rb, nv, nb, qxb, dxb, nsxb, dsxb, ys, yo):
    """rows16 for one token and a kind known at run time (fused's mixed q/k/v types)."""
    if kind == Q8_0:
        rows16(Q8_0, 1, flat, off, rb, nv, nb, qxb, dxb, nsxb, dsxb, 1, ys, yo, 0, 1)
    elif kind == Q4_0:
        rows16(Q4_0, 1, flat, off, rb, nv, nb, qxb, dxb, nsxb, dsxb, 1, ys, yo, 0, 1)
    elif kind == Q4_1:
        rows16(Q4_1, 1, flat, off, rb, nv, nb, qxb, dxb, nsxb, dsxb, 1, ys, yo, 0, 1)
    elif kind == Q5_0:
        rows16(Q5_0, 1, flat, off, rb, nv, nb, qxb, dxb, nsxb, dsxb, 1, ys, yo, 0, 1)
    else:
        rows16(Q5_1, 1, flat, off, rb, nv, nb, qxb, dxb, nsxb, dsxb, 1, ys, yo, 0, 1)


@njit(cache=True, inline="always")
def group_starts(raws):
    """Per matrix of the tuple, its first 16-row group and first output row (n_mat + 1
    entries each)."""
    n_mat = len(raws)
    gs = np.zeros(n_mat + 1, np.int64)
    rs = np.zeros(n_mat + 1, np.int64)
    for m in range(n_mat):
        gs[m + 1] = gs[m] + (raws[m].shape[0] + ROWS - 1) // ROWS
        rs[m + 1] = rs[m] + raws[m].shape[0]
    return gs, rs


@njit(cache=True, inline="always")
def locate(raws, gs, g):
    """Group g of group_starts' numbering -> (matrix m, its first row r0, valid rows)."""
    m = 0
    while g >= gs[m + 1]:
        m += 1
    r0 = (g - gs[m]) * ROWS
    return m, r0, min(ROWS, raws[m].shape[0] - r0)


@njit(cache=True, parallel=True)
def matvec(raw, kind, block_bytes, x, y):
    """y = W x for one legacy matrix (kind its ggml type id): legacy's matvec on VNNI CPUs."""
    qxb, dxb, nsxb, dsxb = prepare(x.reshape((1, x.shape[0])), np.empty(0, np.float32),
                                   np.float32(0), 1)
    n_rows, rb = raw.shape
    nb = rb // block_bytes
    flat = raw.reshape(-1)
    for g in prange((n_rows + ROWS - 1) // ROWS):
        r0 = g * ROWS
        rows_one(kind, flat, r0 * rb, rb, min(ROWS, n_rows - r0), nb, qxb, dxb, nsxb, dsxb,
                 y, r0)
