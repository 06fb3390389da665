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

Over row-major bytes a group's 16 rows are 16 strided streams, which read RAM at 80-90 % of a
linear read on the Zen 5 host measured (reports/streams.md); ``repack`` interleaves each group
block by block so that ``matmul_packed``, the same code, reads one linear stream (101-116 % of
the probe at 2 threads, reports/kernels.md), bit-equal. The engine maps a repacked copy of
the model (prima_ref.repacked) and names each matrix's layout in its kind: ``kind + PACKED``
is that legacy kind over repacked bytes, which ``rows_one`` and the batched kernels take.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from prima_ref.model.ops import rms_norm
from prima_ref.quants import tiled
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
    N_SUB16,
    N_SUB32,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q8_0,
    QH_OFF,
    QK_K,
    QS_OFF,
    ROWS,
    SUB,
    _call,
    _const16,
    _data,
    _half_to_f32,
    _splat,
    available,  # noqa: F401  (lanes.available(): the same CPU test)
    block_fma,
)

MAX_TOKENS = 8
# software prefetch of the group PREFETCH_GROUPS ahead (1 or 4 groups measured no better),
# into L2 (llvm.prefetch locality 1: prefetcht2) except on Zen 5, where prefetcht0 (3) is:
# on Zen 4, 576- to 8192-wide Q8_0/Q4_0 matrices from L3 and RAM, 1 and 2 threads, prefetcht0
# was up to 2x slower on wide rows (measured before the prefetches were spread); on Zen 5, with
# them spread (see _frame), a 1 GiB matrix from RAM at 1 and 2 threads read 2-11 % faster
# with prefetcht0 for every lanes kind (Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q5_K; 2026-12-04)
_ZEN5 = llvm.get_host_cpu_name() == "znver5"
PREFETCH_LOCALITY = 3 if _ZEN5 else 1
PREFETCH_GROUPS = 2
# over a repack()ed matrix (one linear stream a thread): prefetch this far ahead, as
# k_quants' row dot does
PACKED_PREFETCH_BYTES = 8192
# the K kinds these kernels take (matmul_k, rows_k_one), bit-equal to tiled.matmul_k. Q6_K
# is not one: its lanes kernel, bit-equal too, measured 10-50 % slower than k_quants' row dot
# (reports/kernels.md 2026-12-03 10:10: 12.0 against 21.6 GB/s at 4096x4096, 1 thread; about
# 80 stack spills in its loop) and was taken out
LANES_K_KINDS = (Q4_K, Q5_K)
# those whose decode products (k_quants' matmul of 1..8 tokens, fused.kq_matvec) run here:
# none on Zen 5, where k_quants' row dot, one linear stream a thread, reads RAM faster than
# these 16 strided ones (1 GiB, 8192 columns, best of 6 passes beside a probe at 42-43
# GB/s, 2 threads, 2026-12-04: Q4_K 41.1 against 33.8 GB/s, Q5_K 42.6 against 35.0; at 1
# thread 29.1 / 35.1 against 26.4 / 28.1) though 13-26 % slower from cache; what it costs:
# on Zen 5 a K-quant model's decode no longer gives the prefill tiles' bits (as Q6_K never
# did)
K_DECODE_KINDS = () if _ZEN5 else LANES_K_KINDS
K_BLOCK_BYTES = {Q4_K: 144, Q5_K: 176}
# a decode kind at or above PACKED names the legacy kind - PACKED over repack()ed bytes
PACKED = 256
_V4I32 = ir.VectorType(_I32, 4)
_ZERO_F, _ZERO_I = ir.Constant(_V16F32, None), ir.Constant(_V16I32, None)


def _shuffle(b, x, y, idx):
    return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(_I32, len(idx)),
                                              [int(i) for i in idx]))


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


class _Rows:
    """The 16 rows of one block (legacy) or super-block (K) in the loop of ``_frame``: row r
    at p0 (rows 0-7) or p8 (8-15) plus offs[r % 8]."""

    def __init__(self, b, p0, p8, offs):
        self.b, self.p0, self.p8, self.offs = b, p0, p8, offs
        self._quads = {}

    def ptr(self, r, at):
        b = self.b
        return b.gep(b.gep(self.p8 if r >= 8 else self.p0, [self.offs[r % 8]]),
                     [ir.Constant(_I64, at)])

    def quads(self, at):
        """Each row's 16 bytes from byte `at`, transposed: 4 vectors, out[i][r] = dword i."""
        if at not in self._quads:
            b = self.b
            qs = [b.load(b.bitcast(self.ptr(r, at), _V4I32.as_pointer()), align=1)
                  for r in range(ROWS)]
            self._quads[at] = _transpose(b, qs)
        return self._quads[at]

    def dword(self, at):
        """The dword at byte `at` (a multiple of 4) of each row, from the transposed quads."""
        return self.quads(at - at % 16)[at % 16 // 4]

    def halves(self, at):
        """The f16 at byte `at` of each row, as float32: 16 loads into general registers, 4
        of them packed into a qword with shifts and ors on the integer ALUs, then 4 qwords
        into a vector (vmovq, vpunpcklqdq, vinserti128). The vector inserts of one f16 a row
        (14 vpinsrw) took the shuffle pipes the quads' transposes need: 1024x1024 at one
        thread, Q4_0 +11 %, Q5_0 +8 %, Q8_0 +3 %. The same packing of dwords (2 a qword) was
        3-5 % slower than dwords()' vpinsrd."""
        b = self.b
        vec = ir.Constant(ir.VectorType(_I64, ROWS // 4), None)
        for k in range(ROWS // 4):
            q = None
            for j in range(4):
                p = b.bitcast(self.ptr(4 * k + j, at), ir.IntType(16).as_pointer())
                v = b.zext(b.load(p, align=1), _I64)
                v = b.shl(v, ir.Constant(_I64, 16 * j)) if j else v
                q = v if q is None else b.or_(q, v)
            # opaque: else LLVM may rebuild the packing as vector inserts
            vec = b.insert_element(vec, _opaque(b, q), ir.Constant(_I32, k))
        return b.fpext(b.bitcast(vec, ir.VectorType(ir.HalfType(), ROWS)), _V16F32)

    def dwords(self, at):
        """The dword at byte `at` of each row, as one vector: 16 loads (a 16-lane vpgatherdd
        cost a quarter of the legacy loop)."""
        b = self.b
        v = [b.load(b.bitcast(self.ptr(r, at), _I32.as_pointer()), align=1) for r in range(ROWS)]
        vs = [b.insert_element(ir.Constant(_V4I32, None), v[4 * k], ir.Constant(_I32, 0))
              for k in range(4)]
        for k in range(4):
            for j in range(1, 4):
                vs[k] = b.insert_element(vs[k], v[4 * k + j], ir.Constant(_I32, j))
        return _shuffle(b, _shuffle(b, vs[0], vs[1], range(8)),
                        _shuffle(b, vs[2], vs[3], range(8)), range(16))

    def qwords(self, at):
        """(low, high) dwords of the qword at byte `at` of each row, as two vectors."""
        b = self.b
        v2 = ir.VectorType(_I64, 2)
        vs = []
        for k in range(8):
            pair = ir.Constant(v2, None)
            for j in range(2):
                p = b.bitcast(self.ptr(2 * k + j, at), _I64.as_pointer())
                pair = b.insert_element(pair, b.load(p, align=1), ir.Constant(_I32, j))
            vs.append(pair)
        fours = [_shuffle(b, vs[2 * k], vs[2 * k + 1], range(4)) for k in range(4)]
        d = [b.bitcast(_shuffle(b, fours[2 * k], fours[2 * k + 1], range(8)), _V16I32)
             for k in range(2)]
        return (_shuffle(b, d[0], d[1], range(0, 32, 2)),
                _shuffle(b, d[0], d[1], range(1, 32, 2)))


def _frame(block_bytes: int, n_tok: int, elems, body, step: int = 1, packed: bool = False):
    """Code of an intrinsic (raw, off, row_bytes, n_valid, n_blocks, 4 activation arrays (elems
    their element types), padded, ys, y_off, y_stride, n_store): the loop over the (super-)
    blocks of the n_valid rows from byte off (row r at off + r * row_bytes; with n_valid < 16
    the 16 - n_valid rows before off are read too, their lanes not stored) with n_tok float32x16
    accumulators, body(b, blk, k, rows, accs, xptrs, padded, fma, prefetch) -> the
    accumulators after the k blocks from block blk (k = step, then 1 for the blocks left;
    prefetch(part, parts) emits that share of the iteration's prefetches, part 0 first), then
    ys[y_off + t * y_stride + r] = accumulator t, lane r, for t < n_store. packed: the rows
    are repack()ed, the group's block j at off + j * 16 * block_bytes, row r of it at
    r * block_bytes (row_bytes is not read; n_valid must be 16)."""

    def codegen(context, builder, sig, args):
        b = builder
        i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
        rawp = _data(context, b, sig.args[0], args[0], _I8)
        xptrs = [_data(context, b, sig.args[5 + i], args[5 + i], e) for i, e in enumerate(elems)]
        yp = _data(context, b, sig.args[10], args[10], _F32)
        off, rb, nv, nb, padded, yo, ys, n_store = (
            context.cast(b, args[i], sig.args[i], types.int64) for i in (1, 2, 3, 4, 9, 11, 12, 13))
        if packed:  # row r of a block at r * block_bytes; 16 rows a group, no shift
            rb = i64(block_bytes)
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

        def blocks(start, count, k, accs_in):
            """The loop over `count` iterations of k blocks each from block `start`: the
            accumulators after it (accs_in where count is 0)."""
            pre = b.block
            loop, done = b.append_basic_block("lanes.loop"), b.append_basic_block("lanes.done")
            b.cbranch(b.icmp_signed(">", count, i64(0)), loop, done)
            b.position_at_end(loop)
            it = b.phi(_I64)
            accs = [b.phi(_V16F32) for _ in range(n_tok)]
            blk = b.add(start, b.mul(it, i64(k)))
            stride = ROWS * block_bytes if packed else block_bytes
            p0 = _opaque(b, b.gep(rawp, [b.add(first, b.mul(blk, i64(stride)))]))
            rows = _Rows(b, p0, _opaque(b, b.gep(p0, [rb8])), offs)
            # the rows of one group are 16 * row_bytes contiguous bytes, read as 16 strided
            # streams at a time, which the hardware prefetchers follow poorly (short rows: not
            # at all): fetch the group PREFETCH_GROUPS ahead at the same pace (16 blocks a
            # block)
            # (packed: one linear stream, fetched PACKED_PREFETCH_BYTES ahead)
            lead = (i64(PACKED_PREFETCH_BYTES) if packed
                    else b.mul(rb, i64(ROWS * PREFETCH_GROUPS)))
            ahead = b.add(b.add(first, lead), b.mul(blk, i64(ROWS * block_bytes)))
            lines = range(0, ROWS * block_bytes * k, 64)

            def prefetch(part, parts):
                """Share `part` of `parts` of this iteration's prefetches, where the body is
                part/parts through its work. Each share after the first starts behind an
                empty asm that clobbers memory (no instruction): else LLVM schedules every
                prefetch at the loop's top, and a burst of them (a K super-block: 36-44
                lines) holds the miss buffers that the block's own loads then wait for.
                Spread, Q5_K from RAM went 14-20 -> 27 GB/s at 1 thread (Q4_K +15 %, Q4_1 and
                Q5_1 +11 %; 2026-12-04, Zen 5), and with each share's loads kept after it the
                K loop spills less (Q5_K +13 % from L2)."""
                if part:
                    b.asm(ir.FunctionType(ir.VoidType(), []), "", "~{memory}", [], True)
                for j in lines[len(lines) * part // parts:len(lines) * (part + 1) // parts]:
                    _call(b, "llvm.prefetch.p0i8", ir.VoidType(),
                          [b.gep(rawp, [b.add(ahead, i64(j))]), ir.Constant(_I32, 0),
                           ir.Constant(_I32, PREFETCH_LOCALITY), ir.Constant(_I32, 1)])

            new = body(b, blk, k, rows, accs, xptrs, padded, fma, prefetch)
            nxt = b.add(it, i64(1))
            end = b.block
            it.add_incoming(i64(0), pre)
            it.add_incoming(nxt, end)
            for acc, value, was in zip(accs, new, accs_in, strict=True):
                acc.add_incoming(was, pre)
                acc.add_incoming(value, end)
            b.cbranch(b.icmp_signed("<", nxt, count), loop, done)
            b.position_at_end(done)
            out = [b.phi(_V16F32) for _ in new]
            for phi, value, was in zip(out, new, accs_in, strict=True):
                phi.add_incoming(was, pre)
                phi.add_incoming(value, end)
            return out

        # `step` blocks an iteration, then the nb % step left one at a time; in block order
        # either way, so the floats are those of one loop
        whole = b.sdiv(nb, i64(step)) if step > 1 else nb
        phis = blocks(i64(0), whole, step, [_ZERO_F] * n_tok)
        if step > 1:
            done = b.mul(whole, i64(step))
            phis = blocks(done, b.sub(nb, done), 1, phis)
        store = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(ir.VoidType(), [_V16F32, _V16F32.as_pointer(), _I32,
                                                      ir.VectorType(ir.IntType(1), 16)]),
            "llvm.masked.store.v16f32.p0v16f32")
        valid = b.icmp_signed(">=", lanes, _splat(b, b.trunc(shift, _I32), _V16I32))
        none = ir.Constant(valid.type, None)
        yo = b.sub(yo, shift)
        for t, phi in enumerate(phis):
            p = b.gep(yp, [b.add(yo, b.mul(ys, i64(t)))])
            mask = b.select(b.icmp_signed("<", i64(t), n_store), valid, none)  # padding: none
            b.call(store, [phi, b.bitcast(p, _V16F32.as_pointer()), ir.Constant(_I32, 4), mask])
        return context.get_dummy_value()

    return codegen


def _rows(kind: int, n_tok: int, packed: bool = False):
    """Code of rows16 (legacy kinds; packed: rows16_packed): activations qxb, dxb, nsxb, dsxb
    block-major (see prepare); ys[.. t, r] = sum over blocks of d_r dx_t (u_r . qx_t +
    (-sx_t << k)) (+ m_r s_t with a min)."""
    qs_off, has_min, has_qh = QS_OFF[kind], HAS_MIN[kind], HAS_QH[kind]
    c = lambda v: _const16([v] * 16)  # noqa: E731

    bb = BLOCK_BYTES[kind]
    # Q4_1 (20 bytes) and Q5_1 (24) blocks are whole dwords: `step` blocks of a row are
    # whole 16-byte quads (4 x 20 = 5 x 16, 2 x 24 = 3 x 16), so their d|m (and qh) dwords come
    # out of the quads' transposes with the quants, where one block at a time gathers them
    # with 16 vpinsrd (Q4_1) or 16 vmovq (Q5_1) of their own. Q8_0, Q4_0 and Q5_0 take 2
    # blocks an iteration too, each loaded as one block at its own offset: their prefetches
    # then come in two shares (see _frame), 1 GiB from RAM at 1 thread +3-9 % (2026-12-04, Zen
    # 5; from L2 +3 % Q4_0, +11 % Q5_0); 4 blocks (Q8_0) measured 38 % slower
    step = {Q4_1: 4, Q5_1: 2, Q8_0: 2, Q4_0: 2, Q5_0: 2}.get(kind, 1)
    if packed:  # a row's next block is 16 blocks on: one block an iteration
        step = 1

    def weights(b, rows, base, k):
        """(wv, dv, mv) of the block at byte `base` of the rows' pointer (k: blocks in this
        iteration; whole quads for Q4_1 / Q5_1 when k > 1)."""
        if k > 1 and has_min:
            head = rows.dword(base)
            qh = rows.dword(base + QH_OFF[kind]) if has_qh else None
            q4 = [rows.dword(base + qs_off + 4 * i) for i in range(GROUPS // 2)]
        else:
            if has_min and has_qh:  # Q5_1: d, m, qh in the block's first qword
                head, qh = rows.qwords(base)
            elif has_min:  # Q4_1: d, m in the block's first dword
                head, qh = rows.dwords(base), None
            else:  # d through general registers (below); Q5_0's qh at byte 2
                head = None
                qh = rows.dwords(base + QH_OFF[kind]) if has_qh else None
            q4 = None if kind == Q8_0 else rows.quads(base + qs_off)
        if has_min:
            dv, mv = _half_to_f32(b, head), _half_to_f32(b, b.lshr(head, c(16)))
        else:
            dv, mv = rows.halves(base), None
        if kind == Q8_0:
            wv = [b.xor(q, c(0x80808080))
                  for q in rows.quads(base + qs_off) + rows.quads(base + qs_off + 16)]
        else:
            wv = [b.and_(q, c(0x0F0F0F0F)) for q in q4] + \
                 [tiled.high_nibbles(b, q) for q in q4]
            if has_qh:
                for i in range(GROUPS):
                    wv[i] = b.or_(wv[i], tiled.fifth_bits(b, qh, i))
        return wv, dv, mv

    def body(b, blk, k, rows, accs, xptrs, padded, fma, prefetch):
        qp, dxp, sp, dsp = xptrs
        for sub in range(k):  # blocks blk .. blk + k - 1, in order
            prefetch(sub, k)
            wv, dv, mv = weights(b, rows, sub * bb, k)
            new = []
            for t, acc in enumerate(accs):
                slot = b.add(b.mul(b.add(blk, ir.Constant(_I64, sub)), padded),
                             ir.Constant(_I64, t))
                seed = None
                if not has_min:  # -k * sum(qx): the tiles' seed, from -sum(qx)
                    nsx = _splat(b, b.load(b.gep(sp, [slot]), align=4), _V16I32)
                    seed = b.shl(nsx, c(K_SHIFT[kind]))
                new.append(block_fma(b, fma, wv, dv, mv, seed, qp, dxp, dsp, slot, acc))
            accs = new
        return accs

    return _frame(bb, n_tok, (_I32, _F32, _I32, _F32), body, step, packed)


def _rows_k(kind: int, n_tok: int):
    """Code of rows16_k (Q4_K, Q5_K): activations xq, xd, xs32, xs16 block-major Q8_K
    (tiled's _block_major_q8k); ys[.. t, r] = sum over super-blocks of xd_t * (sum over
    sub-blocks j of d_r sc_rj (u_rj . xq_tj (+ seed)) (- dmin_r m_rj s_tj)), the K tiles'
    order (tiled.k_weights / k_dot / k_fma)."""
    n_sub = QK_K // SUB[kind]
    groups = SUB[kind] // 4

    def body(b, sb, k, rows, accs, xptrs, padded, fma, prefetch):  # k: 1 (step 1)
        qp, xdp, s32p, s16p = xptrs
        vec, scales = tiled.k_weights(b, kind, rows.dword)
        slots = [b.add(b.mul(sb, padded), ir.Constant(_I64, t)) for t in range(n_tok)]
        part = [_ZERO_F] * n_tok
        for j in range(n_sub):  # the floats in sub-block order, as the tiles
            prefetch(j, n_sub)
            wv = [vec(groups * j + i) for i in range(groups)]
            dv, mv = scales(j)
            part = [tiled.k_fma(b, fma, tiled.k_dot(b, kind, wv, j, slots[t], qp, s16p), dv, mv,
                                j, slots[t], s32p, part[t]) for t in range(n_tok)]
        return [b.call(fma, [part[t], _splat(b, b.load(b.gep(xdp, [slots[t]]), align=4),
                                            _V16F32), accs[t]]) for t in range(n_tok)]

    return _frame(K_BLOCK_BYTES[kind], n_tok, (_I32, _F32, _F32, _I32), body)


def _literals(what, kind, n_tok, kinds):
    """(kind, n_tok) of an intrinsic's call, both constants, kind one of kinds."""
    for name, lit, allowed in (("kind", kind, kinds), ("n_tok", n_tok, range(1, MAX_TOKENS + 1))):
        if not isinstance(lit, types.IntegerLiteral):
            raise errors.RequireLiteralValue(f"{what}: {name} must be a constant")
        if lit.literal_value not in allowed:
            raise errors.TypingError(f"{what}: no kernel for {name}={lit.literal_value}")
    return kind.literal_value, n_tok.literal_value


@intrinsic
def rows16(typingctx, kind, n_tok, raw, off, row_bytes, n_valid, n_blocks, qxb, dxb, nsxb,
           dsxb, padded, ys, y_off, y_stride, n_store):
    """Legacy kinds: activations from prepare(); Q4_K / Q5_K: tiled's Q8_K block-major
    (xq, xd, xs32, xs16) in the same four places, n_blocks counting super-blocks."""
    k, n = _literals("rows16", kind, n_tok, KINDS + LANES_K_KINDS)
    emit = _rows_k(k, n) if k in LANES_K_KINDS else _rows(k, n)

    def codegen(context, builder, sig, llargs):
        return emit(context, builder, types.none(*sig.args[2:]), llargs[2:])

    return types.none(kind, n_tok, raw, off, row_bytes, n_valid, n_blocks, qxb, dxb, nsxb,
                      dsxb, padded, ys, y_off, y_stride, n_store), codegen


@intrinsic
def rows16_packed(typingctx, kind, n_tok, raw, off, row_bytes, n_valid, n_blocks, qxb, dxb,
                  nsxb, dsxb, padded, ys, y_off, y_stride, n_store):
    """rows16 over a repack()ed legacy matrix from group byte `off` (n_valid 16; row_bytes
    not read): the same bits as rows16 over the rows it was made from."""
    k, n = _literals("rows16_packed", kind, n_tok, KINDS)
    emit = _rows(k, n, packed=True)

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
def ggml_kind(kind):
    """The ggml type of a decode kind, repacked (kind + PACKED) or not."""
    return kind - PACKED if kind >= PACKED else kind


@njit(cache=True, inline="always")
def rows_one(kind, flat, off, rb, nv, nb, qxb, dxb, nsxb, dsxb, ys, yo):
    """rows16 for one token and a kind known at run time (fused's mixed q/k/v types); a
    packed kind reads group byte `off` of a repack()ed matrix (whole groups: nv 16)."""
    if kind >= PACKED:
        _rows_one_packed(kind - PACKED, flat, off, nb, qxb, dxb, nsxb, dsxb, ys, yo)
        return
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
def _rows_one_packed(kind, flat, off, nb, qxb, dxb, nsxb, dsxb, ys, yo):
    if kind == Q8_0:
        rows16_packed(Q8_0, 1, flat, off, 0, ROWS, nb, qxb, dxb, nsxb, dsxb, 1, ys, yo, 0, 1)
    elif kind == Q4_0:
        rows16_packed(Q4_0, 1, flat, off, 0, ROWS, nb, qxb, dxb, nsxb, dsxb, 1, ys, yo, 0, 1)
    elif kind == Q4_1:
        rows16_packed(Q4_1, 1, flat, off, 0, ROWS, nb, qxb, dxb, nsxb, dsxb, 1, ys, yo, 0, 1)
    elif kind == Q5_0:
        rows16_packed(Q5_0, 1, flat, off, 0, ROWS, nb, qxb, dxb, nsxb, dsxb, 1, ys, yo, 0, 1)
    else:
        rows16_packed(Q5_1, 1, flat, off, 0, ROWS, nb, qxb, dxb, nsxb, dsxb, 1, ys, yo, 0, 1)


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


# --- repacked legacy matrices: each 16-row group's blocks interleaved -------------------------


def repack(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    """A copy of a legacy matrix's (n_rows, row_bytes) bytes with each group of 16 rows
    interleaved block by block: group g's block j of row r at byte (g * n_blocks + j) * 16 *
    block_bytes + r * block_bytes of the same-shaped result. matmul_packed then reads each
    thread's share as one linear stream, which this machine's prefetchers follow, where the
    16 strided streams of the row-major layout read 80-88 % of a linear read from RAM (see
    bench/kernels.py NOTES). n_rows must be a multiple of 16."""
    n_rows, rb = raw.shape
    if n_rows % ROWS or rb % block_bytes:
        raise ValueError(f"repack: {n_rows} rows of {rb} bytes is not whole 16-row groups "
                         f"of {block_bytes}-byte blocks")
    nb = rb // block_bytes
    groups = raw.reshape(n_rows // ROWS, ROWS, nb, block_bytes)
    return np.ascontiguousarray(groups.transpose(0, 2, 1, 3)).reshape(n_rows, rb)


def unpack(packed: np.ndarray, block_bytes: int) -> np.ndarray:
    """repack's inverse: the row-major bytes of a repacked matrix (a copy)."""
    n_rows, rb = packed.shape
    nb = rb // block_bytes
    groups = packed.reshape(n_rows // ROWS, nb, ROWS, block_bytes)
    return np.ascontiguousarray(groups.transpose(0, 2, 1, 3)).reshape(n_rows, rb)


@njit(cache=True, inline="always")
def rows_n_packed(kind, n, n_pad, flat, off, nb, qxb, dxb, nsxb, dsxb, ys, yo, ystride):
    """rows16_packed for a constant kind, one 16-row group, n tokens stored of n_pad (1, 2, 4
    or 8) computed."""
    if n_pad == 1:
        rows16_packed(kind, 1, flat, off, 0, ROWS, nb, qxb, dxb, nsxb, dsxb, 1, ys, yo, ystride, n)
    elif n_pad == 2:
        rows16_packed(kind, 2, flat, off, 0, ROWS, nb, qxb, dxb, nsxb, dsxb, 2, ys, yo, ystride, n)
    elif n_pad == 4:
        rows16_packed(kind, 4, flat, off, 0, ROWS, nb, qxb, dxb, nsxb, dsxb, 4, ys, yo, ystride, n)
    else:
        rows16_packed(kind, 8, flat, off, 0, ROWS, nb, qxb, dxb, nsxb, dsxb, 8, ys, yo, ystride, n)


def _compile_packed(kind: int):
    """ys (n, n_rows) = xs W^T from repack(W)'s bytes, any n, 8 tokens a pass."""
    bb = BLOCK_BYTES[kind]

    @njit(cache=True, parallel=True)
    def matmul(packed, xs, ys):
        n_tok, n_rows = ys.shape
        rb = packed.shape[1]
        flat, yf = packed.reshape(-1), ys.reshape(-1)
        for c0 in range(0, n_tok, MAX_TOKENS):
            n = min(MAX_TOKENS, n_tok - c0)
            n_pad = 1 if n <= 1 else 2 if n == 2 else 4 if n <= 4 else 8  # padded_tokens
            qxb, dxb, nsxb, dsxb = prepare(xs[c0:c0 + n], np.empty(0, np.float32),
                                           np.float32(0), n_pad)
            for g in prange(n_rows // ROWS):
                rows_n_packed(kind, n, n_pad, flat, g * ROWS * rb, rb // bb, qxb, dxb, nsxb,
                              dsxb, yf, c0 * n_rows + g * ROWS, n_rows)

    return matmul


_PACKED_KERNELS: dict = {}


def matmul_packed(kind: int, packed: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """ys (n, n_rows) = xs @ W.T from repack(W, ...)'s bytes for a legacy kind and any number
    of tokens, 8 a pass (the 1-8 token kernels; one token: the matvec): bit-equal to
    tiled.matmul over W's rows, so to lanes.matvec's too."""
    if kind not in KINDS:
        raise ValueError(f"matmul_packed: no kernel for ggml type {kind}")
    if packed.shape[0] % ROWS:
        raise ValueError("matmul_packed: a repacked matrix has whole 16-row groups")
    if xs.ndim != 2 or xs.shape[1] != packed.shape[1] // BLOCK_BYTES[kind] * QK:
        raise ValueError(f"matmul_packed: xs {xs.shape} against {packed.shape[1]}-byte rows")
    fn = _PACKED_KERNELS.get(kind)
    if fn is None:
        fn = _PACKED_KERNELS[kind] = _compile_packed(kind)
    ys = np.empty((xs.shape[0], packed.shape[0]), np.float32)
    fn(packed, np.ascontiguousarray(xs, np.float32), ys)
    return ys


@njit(cache=True, inline="always")
def prepare_k(h, padded):
    """h (n, n_cols) as Q8_K activations block-major for `padded` >= n tokens (tiled's layout:
    xq, xd, xs32, xs16), in plain loops (see prepare)."""
    n_slots = h.shape[1] // QK_K * padded
    xq = np.empty(n_slots * QK_K, np.int8)
    xd = np.empty(n_slots, np.float32)
    xs32 = np.empty(n_slots * N_SUB32, np.float32)
    xs16 = np.empty(n_slots * N_SUB16, np.int32)
    for s in range(n_slots):
        tiled.q8k_slot(h, padded, s, xq, xd, xs32, xs16)
    return xq, xd, xs32, xs16


@njit(cache=True, inline="always")
def rows_k_one(kind, flat, off, rb, nv, nsb, xq, xd, xs32, xs16, ys, yo):
    """rows16 for one token of Q8_K activations, Q4_K or Q5_K known at run time."""
    calls, step, rbc, nvc = _calls(off, rb, nv)
    for i in range(calls):
        o, y = off + i * step, yo + i
        if kind == Q4_K:  # LANES_K_KINDS
            rows16(Q4_K, 1, flat, o, rbc, nvc, nsb, xq, xd, xs32, xs16, 1, ys, y, 0, 1)
        else:
            rows16(Q5_K, 1, flat, o, rbc, nvc, nsb, xq, xd, xs32, xs16, 1, ys, y, 0, 1)


def _compile_k(kind: int):
    """ys (n, n_rows) = xs W^T for n <= 8 tokens, one K kind."""

    @njit(cache=True, parallel=True)
    def matmul(raw, xs, n_pad, ys):
        n, n_rows = ys.shape
        rb = raw.shape[1]
        xq, xd, xs32, xs16 = prepare_k(xs, n_pad)
        nsb = xd.shape[0] // n_pad
        flat, yf = raw.reshape(-1), ys.reshape(-1)
        for g in prange((n_rows + ROWS - 1) // ROWS):
            r0 = g * ROWS
            rows_n(kind, n, n_pad, flat, r0 * rb, rb, min(ROWS, n_rows - r0), nsb, xq, xd,
                   xs32, xs16, yf, r0, n_rows)

    return matmul


_K_KERNELS: dict = {}


def matmul_k(kind: int, raw: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """ys (n, n_rows) = xs @ W.T for a Q4_K / Q5_K matrix and 1..8 tokens, x as Q8_K:
    bit-equal to tiled.matmul_k on the same tokens."""
    fn = _K_KERNELS.get(kind)
    if fn is None:
        fn = _K_KERNELS[kind] = _compile_k(kind)
    ys = np.empty((xs.shape[0], raw.shape[0]), np.float32)
    fn(raw, np.ascontiguousarray(xs, np.float32), padded_tokens(xs.shape[0]), ys)
    return ys
