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
    QS_OFF,
    ROWS,
    _call,
    _const16,
    _data,
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
# bit j of a 4-bit index -> bit 4 of byte j (Q5's 5th bits of 4 weights, as in one dword)
_SPREAD = _const16(sum(((n >> j) & 1) << (8 * j + 4) for j in range(4)) for n in range(16))


def _shuffle(b, x, y, idx):
    return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(_I32, len(idx)),
                                              [int(i) for i in idx]))


def _dwords(b, p0, p8, offs, at):
    """The dword at byte `at` of each of the 16 rows, as one vector (16 loads, no gather)."""
    v = [b.load(b.bitcast(b.gep(b.gep(p8 if r >= 8 else p0, [offs[r % 8]]),
                                [ir.Constant(_I64, at)]), _I32.as_pointer()), align=1)
         for r in range(ROWS)]
    vs = [b.insert_element(ir.Constant(_V4I32, None), v[4 * k], ir.Constant(_I32, 0))
          for k in range(4)]
    for k in range(4):
        for j in range(1, 4):
            vs[k] = b.insert_element(vs[k], v[4 * k + j], ir.Constant(_I32, j))
    lo = _shuffle(b, vs[0], vs[1], range(8))
    hi = _shuffle(b, vs[2], vs[3], range(8))
    return _shuffle(b, lo, hi, range(16))


def _qwords(b, p0, p8, offs):
    """(low, high) dwords of the qword at byte 0 of each of the 16 rows, as two vectors."""
    v2 = ir.VectorType(_I64, 2)
    vs = []
    for k in range(8):
        pair = ir.Constant(v2, None)
        for j in range(2):
            r = 2 * k + j
            p = b.gep(p8 if r >= 8 else p0, [offs[r % 8]])
            pair = b.insert_element(pair, b.load(b.bitcast(p, _I64.as_pointer()), align=1),
                                    ir.Constant(_I32, j))
        vs.append(pair)
    fours = [_shuffle(b, vs[2 * k], vs[2 * k + 1], range(4)) for k in range(4)]
    eights = [_shuffle(b, fours[2 * k], fours[2 * k + 1], range(8)) for k in range(2)]
    d = [b.bitcast(e, _V16I32) for e in eights]
    return (_shuffle(b, d[0], d[1], range(0, 32, 2)), _shuffle(b, d[0], d[1], range(1, 32, 2)))


def _opaque(b, value):
    """value, hidden from LLVM's loop and vector analyses (an empty asm; no instruction)."""
    return b.asm(ir.FunctionType(value.type, [value.type]), "", "=r,0", [value], False)


def _transpose(b, quads):
    """16 rows' 4-dword vectors (quads[r]) -> 4 vectors of 16 lanes: out[i][r] = quads[r][i].

    z[k] holds rows k, k + 4, k + 8, k + 12 in its four 128-bit lanes (loads and inserts);
    a 4 x 4 transpose inside each 128-bit lane (8 unpacks, no lane crossing) then leaves
    dword i of rows 4l..4l + 3 in lane l of out[i]: rows 0..15 in order."""
    z = []
    for k in range(4):
        lo = _shuffle(b, quads[k], quads[k + 4], range(8))
        hi = _shuffle(b, quads[k + 8], quads[k + 12], range(8))
        z.append(_shuffle(b, lo, hi, range(16)))

    def unpack(x, y, first):  # per 128-bit lane l: x[4l + f], y[4l + f], x[4l + f + 1], ...
        idx = []
        for lane in range(4):
            for j in first:
                idx += [4 * lane + j, 16 + 4 * lane + j]
        return _shuffle(b, x, y, idx)

    def unpack64(x, y, half):  # per lane: x's and y's dword pair `half` (0: low, 1: high)
        idx = []
        for lane in range(4):
            base = 4 * lane + 2 * half
            idx += [base, base + 1, 16 + base, 16 + base + 1]
        return _shuffle(b, x, y, idx)

    t0, t1 = unpack(z[0], z[1], (0, 1)), unpack(z[0], z[1], (2, 3))
    t2, t3 = unpack(z[2], z[3], (0, 1)), unpack(z[2], z[3], (2, 3))
    return [unpack64(t0, t2, 0), unpack64(t0, t2, 1), unpack64(t1, t3, 0), unpack64(t1, t3, 1)]


def _rows(kind: int, n_tok: int):
    """Code of rows(kind, n, raw, off, row_bytes, n_valid, n_blocks, qxb, dxb, nsxb, dsxb,
    padded, ys, y_off, y_stride, n_store): for the n_valid rows from byte off (row r at off +
    r * row_bytes; with n_valid < 16 the 16 - n_valid rows before off are read too, their
    lanes not stored) and tokens 0..n-1 of the block-major activations,
    ys[y_off + t * y_stride + r] = sum over blocks of d_r dx_t (u_r . qx_t + (-sx_t << k))
    (+ m_r s_t with a min), for t < n_store."""
    bb, qs_off = BLOCK_BYTES[kind], QS_OFF[kind]
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
        # a tail group (nv < 16 rows) is shifted back over rows of the group before it, whose
        # lanes are then not stored: every group reads 16 whole rows (callers pad matrices of
        # fewer than 16 rows), so row r sits at r * row_bytes from one per-block pointer
        shift = b.select(b.icmp_signed("<", nv, i64(ROWS)), b.sub(i64(ROWS), nv), i64(0))
        first = b.sub(off, b.mul(shift, rb))
        lanes = _const16(range(ROWS))
        # rows 0-7 from p0 and 8-15 from p8 as [p + {0, 1, 2, 4} * rb or rb3/rb5/rb7 (* 2)]:
        # six registers; opaque() keeps LLVM from turning the 16 row addresses into 16
        # induction variables (spilled, two instructions each a block) or SIMD lanes
        rb3, rb5, rb7 = (_opaque(b, b.mul(rb, i64(k))) for k in (3, 5, 7))
        offs = [i64(0), rb, b.mul(rb, i64(2)), rb3, b.mul(rb, i64(4)), rb5, b.mul(rb3, i64(2)),
                rb7]
        rb8 = b.mul(rb, i64(8))
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
        p0 = _opaque(b, b.gep(rawp, [b.add(first, boff)]))
        p8 = _opaque(b, b.gep(p0, [rb8]))

        def quads(k):  # each row's dwords k..k+3 of the block's quants, transposed
            qs = []
            for r in range(ROWS):
                row = b.gep(p8 if r >= 8 else p0, [offs[r % 8]])
                p = b.gep(row, [i64(qs_off + 16 * k)])
                qs.append(b.load(b.bitcast(p, _V4I32.as_pointer()), align=1))
            return _transpose(b, qs)

        # the rows of one group are 16 * row_bytes contiguous bytes, read as 16 strided
        # streams at a time, which the hardware prefetchers follow poorly (short rows: not at
        # all): fetch the group PREFETCH_GROUPS ahead at the same pace (16 * bb bytes a block)
        ahead = b.add(b.add(first, b.mul(rb, i64(ROWS * PREFETCH_GROUPS))),
                      b.mul(blk, i64(ROWS * bb)))
        for j in range(0, ROWS * bb, 64):
            pf = b.gep(rawp, [b.add(ahead, i64(j))])
            _call(b, "llvm.prefetch.p0i8", ir.VoidType(),
                  [pf, ir.Constant(_I32, 0), ir.Constant(_I32, PREFETCH_LOCALITY),
                   ir.Constant(_I32, 1)])
        if has_qh:  # d (and m), then qh: one qword a row
            head, high = _qwords(b, p0, p8, offs)
            qh = high if has_min else b.or_(b.lshr(head, c(16)), b.shl(high, c(16)))
        else:
            head = _dwords(b, p0, p8, offs, 0)
        dv = _half_to_f32(b, head)
        mv = _half_to_f32(b, b.lshr(head, c(16))) if has_min else None
        if kind == Q8_0:
            wv = [b.xor(q, c(0x80808080)) for q in quads(0) + quads(1)]
        else:
            q4 = quads(0)
            wv = [b.and_(q, c(0x0F0F0F0F)) for q in q4] + \
                 [b.and_(b.lshr(q, c(4)), c(0x0F0F0F0F)) for q in q4]
            if has_qh:  # bit j of qh: 5th bit of weight j, to bit 4 of its byte
                for i in range(GROUPS):  # qh's 4 bits of group i, spread by a vpermd table
                    four = b.lshr(qh, c(4 * i)) if i else qh  # vpermd reads 4 index bits
                    wv[i] = b.or_(wv[i], _call(b, "llvm.x86.avx512.permvar.si.512", _V16I32,
                                               [_SPREAD, four]))
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
        valid = b.icmp_signed(">=", lanes, _splat(b, b.trunc(shift, _I32), _V16I32))
        none = ir.Constant(valid.type, None)
        yo = b.sub(yo, shift)
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
def _calls(off, rb, nv):
    """rows16 reads 16 whole rows, a tail group shifted back over the group before it; a
    matrix of fewer than 16 rows has none before, so it goes row by row, each call reading
    one row 16 times (row_bytes 0) and storing one lane: (calls, off step, row_bytes, nv)."""
    if nv < ROWS and off < (ROWS - nv) * rb:
        return nv, rb, 0, 1
    return 1, 0, rb, nv


@njit(cache=True, inline="always")
def rows_n(kind, n, n_pad, flat, off, rb, nv, nb, qxb, dxb, nsxb, dsxb, ys, yo, ystride):
    """rows16 for a constant kind, n tokens stored of n_pad (1, 2, 4 or 8) computed."""
    calls, step, rbc, nvc = _calls(off, rb, nv)
    for i in range(calls):
        o, y = off + i * step, yo + i
        if n_pad == 1:
            rows16(kind, 1, flat, o, rbc, nvc, nb, qxb, dxb, nsxb, dsxb, 1, ys, y, ystride, n)
        elif n_pad == 2:
            rows16(kind, 2, flat, o, rbc, nvc, nb, qxb, dxb, nsxb, dsxb, 2, ys, y, ystride, n)
        elif n_pad == 4:
            rows16(kind, 4, flat, o, rbc, nvc, nb, qxb, dxb, nsxb, dsxb, 4, ys, y, ystride, n)
        else:
            rows16(kind, 8, flat, o, rbc, nvc, nb, qxb, dxb, nsxb, dsxb, 8, ys, y, ystride, n)


@njit(cache=True, inline="always")
def rows_one(kind, flat, off, rb, nv, nb, qxb, dxb, nsxb, dsxb, ys, yo):
    """rows16 for one token and a kind known at run time (fused's mixed q/k/v types)."""
    calls, step, rbc, nvc = _calls(off, rb, nv)
    for i in range(calls):
        o, y = off + i * step, yo + i
        if kind == Q8_0:
            rows16(Q8_0, 1, flat, o, rbc, nvc, nb, qxb, dxb, nsxb, dsxb, 1, ys, y, 0, 1)
        elif kind == Q4_0:
            rows16(Q4_0, 1, flat, o, rbc, nvc, nb, qxb, dxb, nsxb, dsxb, 1, ys, y, 0, 1)
        elif kind == Q4_1:
            rows16(Q4_1, 1, flat, o, rbc, nvc, nb, qxb, dxb, nsxb, dsxb, 1, ys, y, 0, 1)
        elif kind == Q5_0:
            rows16(Q5_0, 1, flat, o, rbc, nvc, nb, qxb, dxb, nsxb, dsxb, 1, ys, y, 0, 1)
        else:
            rows16(Q5_1, 1, flat, o, rbc, nvc, nb, qxb, dxb, nsxb, dsxb, 1, ys, y, 0, 1)


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
