"""Prefill matmul in register tiles: 16 weight rows x TILE_TOKENS tokens per inner loop.

The int8 dot runs with the weight ROWS in the vector lanes: lane r of a 512-bit vpdpbusd holds
4 consecutive quants of row r, and x's 4 matching int8 values are broadcast to every lane from
memory. After the 8 dots of a 32-weight block each lane holds its row's whole integer block
dot, so a block costs one convert and one FMA per 16 rows and token (no horizontal sums), and
the tile's TILE_TOKENS accumulators stay in registers over the whole row.

That needs the weights transposed: a task takes 16 rows, gathers each block's quants (one
vpgatherdd per 4 weights of the 16 rows), decodes them to unsigned bytes and keeps them, with
the rows' f16 scales as float32, in a scratch buffer of its own (16 x n_cols bytes: L1/L2)
that every token tile then reads. The file stays mapped as it is; nothing is repacked on disk
or kept in anonymous memory beyond one task.

Integers and scales are llama.cpp's (activations from legacy.prepare_activations: Q8_0 / Q8_1
exactly as ggml quantizes them): types without a min start each block dot at -k * sum(qx)
(the u_j - k offset of legacy.py), Q4_1 / Q5_1 add m * s per block. Only the float32
summation order differs from ggml's vec_dot (one FMA per block, blocks in order).
"""

from __future__ import annotations

import os

import numpy as np
from gguf.constants import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from prima_ref.quants.layouts import LAYOUTS, QK_LEGACY
from prima_ref.quants.simd import cpu_features, q8_k_iscale, q8_k_quant

ROWS = 16  # weight rows per tile: the 16 int32 lanes of a 512-bit vector
TILE_TOKENS = 8  # tokens per tile: 8 accumulators + 8 weight vectors stay in zmm registers
QK = QK_LEGACY
GROUPS = QK // 4  # 4-byte groups per block: one vpdpbusd each
W_BYTES = ROWS * QK  # repacked quants of one block of 16 rows

_I1, _I8, _I16, _I32, _I64 = (ir.IntType(n) for n in (1, 8, 16, 32, 64))
_F32 = ir.FloatType()
_V16I32, _V16F32 = ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)
_V16I16 = ir.VectorType(_I16, 16)
_V16I1 = ir.VectorType(_I1, 16)

Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 = (int(t) for t in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1))
KINDS = (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)
HAS_MIN = {Q8_0: False, Q4_0: False, Q4_1: True, Q5_0: False, Q5_1: True}
HAS_QH = {Q8_0: False, Q4_0: False, Q4_1: False, Q5_0: True, Q5_1: True}
BLOCK_BYTES = {k: LAYOUTS[T(k)].type_size for k in KINDS}
QH_OFF = {k: 2 * (1 + HAS_MIN[k]) for k in KINDS}  # d (and m) are f16 first
QS_OFF = {k: QH_OFF[k] + 4 * HAS_QH[k] for k in KINDS}
K_SHIFT = {Q8_0: 7, Q4_0: 3, Q5_0: 4}  # the offset k = 1 << shift of legacy.py's u_j - k


def _splat(b, value, ty):
    v = b.insert_element(ir.Constant(ty, None), value, ir.Constant(_I32, 0))
    return b.shuffle_vector(v, ir.Constant(ty, None), ir.Constant(_V16I32, [0] * ty.count))


def _const16(values):
    return ir.Constant(_V16I32, [int(v) for v in values])


# byte-level extensions beside AVX512-VNNI (Ice Lake, Zen 4 and later have both; Cascade Lake
# neither): vpmultishiftqb for Q5's 5th bits (fifth_bits), GFNI's vgf2p8affineqb for nibble and
# bit moves (high_nibbles, bit_to_4). PRIMA_VNNI_ONLY=1 takes the plain shifts and masks (the
# same integers; a test checks the bits)
_EXTENSIONS = os.environ.get("PRIMA_VNNI_ONLY") != "1"
VBMI = bool(cpu_features().get("avx512vbmi")) and _EXTENSIONS
GFNI = bool(cpu_features().get("gfni")) and _EXTENSIONS
_MULTISHIFT = [ir.Constant(ir.VectorType(_I8, 64),
                           [(4 * i + p % 4 - 4 + 32 * (p // 4 % 2)) % 64 for p in range(64)])
               for i in range(GROUPS)]
# bit j of a 4-bit index -> bit 4 of byte j (Q5's 5th bits of 4 weights, as in one dword)
_SPREAD = _const16(sum(((n >> j) & 1) << (8 * j + 4) for j in range(4)) for n in range(16))


def _call(b, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return b.call(cgutils.get_or_insert_function(b.module, fnty, name), args)


def _data(context, builder, ty, value, elem):
    data = context.make_array(ty)(context, builder, value).data
    return builder.bitcast(data, elem.as_pointer())


def _gather(b, base, idx, mask):
    """The dword at base + idx[r] for each lane r where mask (else 0)."""
    return _call(b, "llvm.x86.avx512.mask.gather.dpi.512", _V16I32,
                 [ir.Constant(_V16I32, None), base, idx, mask, ir.Constant(_I32, 1)])


def _half_to_f32(b, words):
    """Low 16 bits of each lane, an f16, as float32."""
    h = b.bitcast(b.trunc(words, _V16I16), ir.VectorType(ir.HalfType(), 16))
    return b.fpext(h, _V16F32)


_ZERO_F, _ZERO_I = ir.Constant(_V16F32, None), ir.Constant(_V16I32, None)


def _tile_loop(context, b, sig, args, elems, label, body):
    """The frame both tile intrinsics share (args: 7 arrays, n, padded, t0, out): pointers to
    the 7 arrays (elems their element types), a loop over the n blocks (or super-blocks) with
    TILE_TOKENS float32x16 accumulators, body(b, index, accs, ptrs, padded, t0, fma) -> the
    accumulators after that block, and the final ones stored at out[0:TILE_TOKENS]."""
    ptrs = [_data(context, b, sig.args[i], args[i], e) for i, e in enumerate(elems)]
    outp = _data(context, b, sig.args[10], args[10], _V16F32)
    nb, padded, t0 = (context.cast(b, args[i], sig.args[i], types.int64) for i in (7, 8, 9))
    fma = cgutils.get_or_insert_function(
        b.module, ir.FunctionType(_V16F32, [_V16F32] * 3), "llvm.fma.v16f32")
    pre = b.block
    loop, done = b.append_basic_block(f"{label}.loop"), b.append_basic_block(f"{label}.done")
    b.cbranch(b.icmp_signed(">", nb, ir.Constant(_I64, 0)), loop, done)
    b.position_at_end(loop)
    idx = b.phi(_I64)
    accs = [b.phi(_V16F32) for _ in range(TILE_TOKENS)]
    new = body(b, idx, accs, ptrs, padded, t0, fma)
    nxt = b.add(idx, ir.Constant(_I64, 1))
    end = b.block
    idx.add_incoming(ir.Constant(_I64, 0), pre)
    idx.add_incoming(nxt, end)
    for acc, value in zip(accs, new, strict=True):
        acc.add_incoming(_ZERO_F, pre)
        acc.add_incoming(value, end)
    b.cbranch(b.icmp_signed("<", nxt, nb), loop, done)
    b.position_at_end(done)
    phis = [b.phi(_V16F32) for _ in new]  # every phi first: LLVM wants them atop the block
    for t, (phi, value) in enumerate(zip(phis, new, strict=True)):
        phi.add_incoming(_ZERO_F, pre)
        phi.add_incoming(value, end)
        b.store(phi, b.gep(outp, [ir.Constant(_I64, t)]), align=4)
    return context.get_dummy_value()


def fifth_bits(b, qh, i):
    """Q5's 5th bits of group i (weights 4i .. 4i + 3, bits 4i .. of each row's qh dword) at
    bit 4 of their bytes. With AVX512-VBMI one vpmultishiftqb moves each byte's bit into place
    (control: per byte j of row dword h of a qword, the rotation 4i + j - 4 + 32h) and an AND
    keeps it; else a shift and a vpermd table."""
    if VBMI:
        v64 = ir.VectorType(_I8, 64)
        got = _call(b, "llvm.x86.avx512.pmultishift.qb.512", v64,
                    [_MULTISHIFT[i], b.bitcast(qh, v64)])
        return b.and_(b.bitcast(got, _V16I32), _const16([0x10101010] * 16))
    four = b.lshr(qh, _const16([4 * i] * 16)) if i else qh  # vpermd reads 4 index bits
    return _call(b, "llvm.x86.avx512.permvar.si.512", _V16I32, [_SPREAD, four])


def _affine(b, v, rows):
    """vgf2p8affineqb with one bit matrix for every byte of v (16 x i32): output bit i of a
    byte is the parity of (byte & rows[i]) (rows: 8 masks, rows[i] = 0 clears bit i)."""
    v64 = ir.VectorType(_I8, 64)
    qword = sum(int(m) << (8 * (7 - i)) for i, m in enumerate(rows))
    matrix = ir.Constant(v64, [(qword >> (8 * k)) & 0xFF for k in range(8)] * 8)
    got = _call(b, "llvm.x86.vgf2p8affineqb.512", v64,
                [b.bitcast(v, v64), matrix, ir.Constant(_I8, 0)])
    return b.bitcast(got, _V16I32)


def high_nibbles(b, q):
    """(q >> 4) & 0x0F0F0F0F: one GFNI op where there is GFNI."""
    if GFNI:
        return _affine(b, q, [0x10, 0x20, 0x40, 0x80, 0, 0, 0, 0])
    return b.and_(b.lshr(q, _const16([4] * 16)), _const16([0x0F0F0F0F] * 16))


def bit_to_4(b, h, j):
    """Bit j of each byte of h at bit 4, the other bits 0: one GFNI op where there is GFNI."""
    if GFNI:
        return _affine(b, h, [0, 0, 0, 0, 1 << j, 0, 0, 0])
    c = lambda v: _const16([v] * 16)  # noqa: E731
    h = b.shl(h, c(4 - j)) if j < 4 else b.lshr(h, c(j - 4)) if j > 4 else h
    return b.and_(h, c(0x10101010))


def _repack(kind: int):
    """Code of repack(kind, raw, off, row_bytes, n_valid, w, wo, d, m, so): the block at byte
    off of 16 rows (row r at off + r * row_bytes; rows >= n_valid read as zero) as 8 vectors of
    16 lanes x 4 unsigned quants at w[wo:], lane r = row r; its scales (and mins) as float32 at
    d[so:so+16] (m[so:so+16])."""
    qs_off, qh_off = QS_OFF[kind], QH_OFF[kind]

    def codegen(context, builder, sig, args):
        b = builder
        rawp = _data(context, b, sig.args[0], args[0], _I8)
        wp = _data(context, b, sig.args[4], args[4], _I8)
        dp = _data(context, b, sig.args[6], args[6], _F32)
        mp = _data(context, b, sig.args[7], args[7], _F32)
        off, rb, nv, wo, so = (context.cast(b, args[i], sig.args[i], types.int64)
                               for i in (1, 2, 3, 5, 8))
        lanes = _const16(range(ROWS))
        idx = b.mul(_splat(b, b.trunc(rb, _I32), _V16I32), lanes)
        mask = b.icmp_signed("<", lanes, _splat(b, b.trunc(nv, _I32), _V16I32))
        base = b.gep(rawp, [off])

        def at(k):
            return _gather(b, b.gep(base, [ir.Constant(_I64, k)]), idx, mask)

        def store(i, vec):
            p = b.gep(wp, [b.add(wo, ir.Constant(_I64, 64 * i))])
            b.store(vec, b.bitcast(p, _V16I32.as_pointer()), align=1)

        head = at(0)  # d (| m) in the low (high) 16 bits
        dptr = b.bitcast(b.gep(dp, [so]), _V16F32.as_pointer())
        b.store(_half_to_f32(b, head), dptr, align=4)
        if HAS_MIN[kind]:
            mptr = b.bitcast(b.gep(mp, [so]), _V16F32.as_pointer())
            b.store(_half_to_f32(b, b.lshr(head, _const16([16] * 16))), mptr, align=4)
        if kind == Q8_0:  # int8 bits + 128: the unsigned quant
            for i in range(GROUPS):
                store(i, b.xor(at(qs_off + 4 * i), _const16([0x80808080] * 16)))
            return context.get_dummy_value()
        nib = _const16([0x0F0F0F0F] * 16)
        vecs = [None] * GROUPS
        for i in range(GROUPS // 2):  # byte j of qs: low nibble weight j, high j + 16
            q = at(qs_off + 4 * i)
            vecs[i] = b.and_(q, nib)
            vecs[i + GROUPS // 2] = high_nibbles(b, q)
        if HAS_QH[kind]:  # bit j of qh: 5th bit of weight j, moved to bit 4 of its byte
            qh = at(qh_off)
            for i in range(GROUPS):
                vecs[i] = b.or_(vecs[i], fifth_bits(b, qh, i))
        for i, vec in enumerate(vecs):
            store(i, vec)
        return context.get_dummy_value()

    return codegen


def block_fma(b, fma, wv, dv, mv, seed, qp, dxp, dsp, slot, acc):
    """acc + d_r dx (u_r . qx + seed) (+ m_r s) for one 32-weight block of 16 rows (wv: its 8
    vectors of 4 unsigned quants per row lane, dv / mv the rows' scales / mins or None) and
    the token in block-major slot `slot` (qp: its int8 quants 4 per dword, dxp its scale, dsp
    its Q8_1 sum; seed None: start at zero): the arithmetic the prefill tiles and the decode
    lanes (prima_ref.quants.lanes) share, so their floats agree bit for bit."""
    dot = _ZERO_I if seed is None else seed
    q0 = b.mul(slot, ir.Constant(_I64, GROUPS))
    for i in range(GROUPS):
        xq = b.load(b.gep(qp, [b.add(q0, ir.Constant(_I64, i))]), align=4)
        dot = _call(b, "llvm.x86.avx512.vpdpbusd.512", _V16I32,
                    [dot, wv[i], _splat(b, xq, _V16I32)])
    scale = b.fmul(dv, _splat(b, b.load(b.gep(dxp, [slot]), align=4), _V16F32))
    acc = b.call(fma, [b.sitofp(dot, _V16F32), scale, acc])
    if mv is not None:
        s = _splat(b, b.load(b.gep(dsp, [slot]), align=4), _V16F32)
        acc = b.call(fma, [mv, s, acc])
    return acc


def _tile(kind: int):
    """Code of tile(kind, w, d, m, qxb, dxb, seedb, dsxb, n_blocks, padded, t0, out): for the 16
    rows repacked in w/d/m and tokens t0 .. t0 + TILE_TOKENS of the block-major activations,
    out[16 t + r] = sum over blocks of d_r dx_t (u_r . qx_t + seed_t) (+ m_r s_t with a min)."""
    has_min = HAS_MIN[kind]

    def body(b, blk, accs, ptrs, padded, t0, fma):
        wp, dp, mp, qp, dxp, sp, dsp = ptrs
        wv = [b.load(b.gep(wp, [b.add(b.mul(blk, ir.Constant(_I64, GROUPS)),
                                      ir.Constant(_I64, i))]), align=1)
              for i in range(GROUPS)]
        dv = b.load(b.gep(dp, [blk]), align=4)
        mv = b.load(b.gep(mp, [blk]), align=4) if has_min else None
        slot0 = b.add(b.mul(blk, padded), t0)  # block-major slot of token t0
        new = []
        for t, acc in enumerate(accs):
            slot = b.add(slot0, ir.Constant(_I64, t))
            seed = None if has_min else _splat(b, b.load(b.gep(sp, [slot]), align=4), _V16I32)
            new.append(block_fma(b, fma, wv, dv, mv, seed, qp, dxp, dsp, slot, acc))
        return new

    def codegen(context, builder, sig, args):
        elems = (_V16I32, _V16F32, _V16F32, _I32, _F32, _I32, _F32)  # qxb: 4 int8 per dword
        return _tile_loop(context, builder, sig, args, elems, "tile", body)

    return codegen


def _by_kind(emitter, kinds, kind, args):
    """Typing of a module-level intrinsic f(kind, *args) whose code emitter(kind) writes. kind
    must be a compile-time constant: the drivers pass the int their closure holds, which Numba
    types as a literal. So the drivers close over numbers only, which Numba's cache keys by
    value (a closure over an intrinsic pickles differently in every process: always a miss)."""
    if not isinstance(kind, types.IntegerLiteral):
        raise errors.RequireLiteralValue(f"{emitter.__name__}: kind must be a constant")
    if kind.literal_value not in kinds:
        raise errors.TypingError(f"{emitter.__name__}: no tiled kernel for type {kind}")
    emit = emitter(kind.literal_value)

    def codegen(context, builder, sig, llargs):
        return emit(context, builder, types.none(*sig.args[1:]), llargs[1:])

    return types.none(kind, *args), codegen


@intrinsic
def prefetch_l2(typingctx, raw, off):
    """Hint the cache line at byte off of a byte array into L2 (prefetcht1)."""
    if not (isinstance(raw, types.Array) and raw.dtype == types.uint8
            and isinstance(off, types.Integer)):
        return None

    def codegen(context, b, sig, args):
        p = b.gep(_data(context, b, sig.args[0], args[0], _I8),
                  [context.cast(b, args[1], sig.args[1], types.int64)])
        _call(b, "llvm.prefetch.p0i8", ir.VoidType(),
              [p, ir.Constant(_I32, 0), ir.Constant(_I32, PREFETCH_LOCALITY), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.none(raw, off), codegen


# llvm.prefetch locality 2 (prefetcht1). A task prefetches its own group, then the next one:
# SmolLM2 Q4_1 prefill of 9 tokens (2 threads) took 55-62 ms without, 24-36 ms with both
# (own group only: 33-37, next only: 30-38), 64 tokens 98 -> 73-84 ms; locality 1 and 3 were
# no better
PREFETCH_LOCALITY = 2


@njit(cache=True, inline="always")
def prefetch_group(flat, r0, n_rows, row_bytes):
    """Prefetch the 16-row group at row r0 (its rows are contiguous bytes). repack's gathers
    touch 16 rows' lines at once, which the hardware prefetchers do not fetch ahead: without
    this every group waits on DRAM line by line (a matmul right after other work took 2-4x
    its time when repeated on warm weights)."""
    if r0 < n_rows:
        for k in range(r0 * row_bytes, min(r0 + ROWS, n_rows) * row_bytes, 64):
            prefetch_l2(flat, k)


@intrinsic
def repack(typingctx, kind, raw, off, row_bytes, n_valid, w, wo, d, m, so):
    return _by_kind(_repack, KINDS, kind, (raw, off, row_bytes, n_valid, w, wo, d, m, so))


@intrinsic
def tile(typingctx, kind, w, d, m, qxb, dxb, seedb, dsxb, n_blocks, padded, t0, out):
    return _by_kind(_tile, KINDS, kind, (w, d, m, qxb, dxb, seedb, dsxb, n_blocks, padded, t0,
                                         out))


def _compile(kind: int, packed: bool):
    """packed: raw is lanes.repack()ed (whole 16-row groups): a group's block blk of row r at
    (r0 * row_bytes + blk * 16 * bb) + r * bb, the same bytes gathered, so the same bits."""
    bb = BLOCK_BYTES[kind]
    block_step = ROWS * bb if packed else bb

    @njit(cache=True, parallel=True)
    def matmul(raw, qxb, dxb, seedb, dsxb, ys):
        """ys (n_tokens, n_rows) = W x for the block-major activations (padded tokens)."""
        n_tokens, n_rows = ys.shape
        row_bytes = raw.shape[1]
        row_step = bb if packed else row_bytes
        n_blocks = row_bytes // bb
        padded = dxb.shape[0] // n_blocks
        flat = raw.reshape(-1)
        for g in prange((n_rows + ROWS - 1) // ROWS):
            r0 = g * ROWS
            prefetch_group(flat, r0, n_rows, row_bytes)
            prefetch_group(flat, r0 + ROWS, n_rows, row_bytes)
            n_valid = min(ROWS, n_rows - r0)
            w = np.empty(n_blocks * W_BYTES + 64, np.uint8)
            w = w[(64 - w.ctypes.data % 64) % 64 :]  # 64-byte aligned vector stores
            d = np.empty(n_blocks * ROWS, np.float32)
            m = np.empty(n_blocks * ROWS, np.float32)
            for blk in range(n_blocks):
                repack(kind, flat, r0 * row_bytes + blk * block_step, row_step, n_valid, w,
                       blk * W_BYTES, d, m, blk * ROWS)
            out = np.empty(TILE_TOKENS * ROWS, np.float32)  # (TILE_TOKENS, ROWS)
            for t0 in range(0, padded, TILE_TOKENS):
                tile(kind, w, d, m, qxb, dxb, seedb, dsxb, n_blocks, padded, t0, out)
                for t in range(min(TILE_TOKENS, n_tokens - t0)):
                    for r in range(n_valid):
                        ys[t0 + t, r0 + r] = out[t * ROWS + r]

    return matmul


_KERNELS: dict = {}


def available() -> bool:
    """512-bit vpdpbusd and vpgatherdd: AVX512-VNNI (with F/BW)."""
    f = cpu_features()
    return bool(f.get("avx512vnni") and f.get("avx512bw") and f.get("avx512f"))


def enabled() -> bool:
    """Whether the prefill matmul takes these kernels: where available(), unless PRIMA_TILED=0
    (which leaves the row-at-a-time legacy/K-quant matmul, for comparison)."""
    return os.environ.get("PRIMA_TILED") != "0" and available()


def matmul(kind: int, raw: np.ndarray, act, packed: bool = False) -> np.ndarray:
    """ys (n_tokens, n_rows) for a legacy-quant matrix and legacy.prepare_activations' act
    (whose token count pads to a multiple of TILE_TOKENS); packed: raw holds lanes.repack()'s
    layout of the matrix (whole 16-row groups), same bits."""
    if packed and raw.shape[0] % ROWS:
        raise ValueError("tiled.matmul: a repacked matrix has whole 16-row groups")
    fn = _KERNELS.get((kind, packed))
    if fn is None:
        fn = _KERNELS[(kind, packed)] = _compile(kind, packed)
    ys = np.empty((act.n_tokens, raw.shape[0]), np.float32)  # (n_tokens, n_rows)
    seeds = act.seeds(K_SHIFT.get(kind, 0))
    fn(raw, act.qxb, act.dxb, seeds, act.dsxb, ys)
    return ys


# --- K-quants: super-blocks of 256, sub-block scales (Q4_K, Q5_K: 8 x 32 with mins; Q6_K:
# 16 x 16 with a -32 offset). x is llama.cpp's Q8_K (k_quants.py). Per sub-block j and token t
# the dot is converted once and scaled by the rows' d * sc_j; mins meet -sum(x_j) as floats
# (exact small integers); the super-block total takes x's scale once.

Q4_K, Q5_K, Q6_K = int(T.Q4_K), int(T.Q5_K), int(T.Q6_K)
K_KINDS = (Q4_K, Q5_K, Q6_K)
SUB = {Q4_K: 32, Q5_K: 32, Q6_K: 16}  # weights per sub-block
K_MINS = {Q4_K: True, Q5_K: True, Q6_K: False}
QK_K = 256
K_VECTORS = QK_K // 4  # repacked vectors per super-block
N_SUB32, N_SUB16 = QK_K // 32, QK_K // 16


def _scales_k4(b, u0, u1, u2, j):
    """get_scale_min_k4 on 16 rows at once: 6-bit scale and min j from the 12 scale bytes."""
    c = lambda v: _const16([v] * 16)  # noqa: E731
    byte = lambda u, k: b.and_(b.lshr(u, c(8 * k)), c(0xFF))  # noqa: E731
    if j < 4:
        return b.and_(byte(u0, j), c(63)), b.and_(byte(u1, j), c(63))
    k = j - 4
    sc = b.or_(b.and_(byte(u2, k), c(0xF)), b.shl(b.lshr(byte(u0, k), c(6)), c(4)))
    mn = b.or_(b.lshr(byte(u2, k), c(4)), b.shl(b.lshr(byte(u1, k), c(6)), c(4)))
    return sc, mn


def k_weights(b, kind: int, at):
    """One K super-block of 16 rows, from at(k) (the dword at byte k of each row's super-block,
    16 lanes): (vec, scales) with vec(i) emitting weight vector i (4 unsigned quants of
    weights 4i..4i+3 per row lane) and scales(j) emitting sub-block j's (d * sc_j, dmin * m_j)
    as float32 (None for the min without mins): each where the caller needs it, so no
    sub-block's scales wait in registers (or spilled) for the others. The prefill tiles
    (gathers) and the decode lanes (transposed row loads, prima_ref.quants.lanes) both unpack
    through here, so their integers and scales agree."""
    c = lambda v: _const16([v] * 16)  # noqa: E731
    if kind in (Q4_K, Q5_K):
        head = at(0)
        d, dmin = _half_to_f32(b, head), _half_to_f32(b, b.lshr(head, c(16)))
        u0, u1, u2 = at(4), at(8), at(12)
        # Q4_K's odd sub-blocks (high nibbles) stay in place, 16 x their quant (a mask, no
        # shift), their scale 16 x smaller: d / 16 * sc is exactly d * sc / 16 (a power of two,
        # far from subnormal) and 16 dot < 2^24 converts exactly, so every product and sum is
        # the one of the shifted nibbles
        d16 = b.fmul(d, ir.Constant(_V16F32, [1 / 16] * 16)) if kind == Q4_K else d

        def scales(j):
            sc, mn = _scales_k4(b, u0, u1, u2, j)
            return (b.fmul(d16 if j % 2 else d, b.sitofp(sc, _V16F32)),
                    b.fmul(dmin, b.sitofp(mn, _V16F32)))

        qs, qh = (16, None) if kind == Q4_K else (48, 16)

        def vec(v):  # qs[32c + l]: low nibble weight 64c + l, high 64c + 32 + l
            j, i = divmod(v, 8)
            q = at(qs + 32 * (j // 2) + 4 * i)
            if kind == Q4_K:
                return b.and_(q, c(0xF0F0F0F0 if j % 2 else 0x0F0F0F0F))
            u = high_nibbles(b, q) if j % 2 else b.and_(q, c(0x0F0F0F0F))
            # 5th bit of weight 32j + l: bit j of qh[l]
            return b.or_(u, bit_to_4(b, at(qh + 4 * i), j))

        return vec, scales
    d = _half_to_f32(b, b.lshr(at(206), c(16)))  # bytes 208-209 (no read past block)

    def scales(j):
        word = at(192 + 4 * (j // 4))
        sc = b.ashr(b.shl(word, c(24 - 8 * (j % 4))), c(24))  # int8 scale j
        return b.fmul(d, b.sitofp(sc, _V16F32)), None

    def vec(i):
        h, r = divmod(4 * i, 128)
        quarter, ll = divmod(r, 32)
        low = b.and_(b.lshr(at(64 * h + 32 * (quarter % 2) + ll), c(4 * (quarter // 2))),
                     c(0x0F0F0F0F))
        high = b.and_(b.lshr(at(128 + 32 * h + ll), c(2 * quarter)), c(0x03030303))
        return b.or_(low, b.shl(high, c(4)))

    return vec, scales


def k_dot(b, kind, wv, j, slot, qp, s16p):
    """The integer dot of K sub-block j of 16 rows (wv its weight vectors) with the Q8_K token
    in block-major slot `slot` (qp its quants 4 per dword; Q6_K starts from its -32 * sum)."""
    i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
    groups = SUB[kind] // 4
    if K_MINS[kind]:
        dot = _ZERO_I
    else:
        seed = b.load(b.gep(s16p, [b.add(b.mul(slot, i64(N_SUB16)), i64(j))]))
        dot = _splat(b, seed, _V16I32)
    q0 = b.add(b.mul(slot, i64(K_VECTORS)), i64(groups * j))
    for i in range(groups):
        xv = b.load(b.gep(qp, [b.add(q0, i64(i))]), align=1)
        dot = _call(b, "llvm.x86.avx512.vpdpbusd.512", _V16I32,
                    [dot, wv[i], _splat(b, xv, _V16I32)])
    return dot


def k_fma(b, fma, dot, dv, mv, j, slot, s32p, part):
    """part + sub-block j's dot (k_dot) scaled by dv = d * sc_j, then dmin * m_j (mv, or None)
    times the token's -sum: one convert and FMA per sub-block, in sub-block order; the tiles'
    and the decode lanes' shared arithmetic."""
    part = b.call(fma, [b.sitofp(dot, _V16F32), dv, part])
    if mv is not None:
        i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
        nsx = b.load(b.gep(s32p, [b.add(b.mul(slot, i64(N_SUB32)), i64(j))]))
        part = b.call(fma, [mv, _splat(b, nsx, _V16F32), part])
    return part


def _repack_k(kind: int):
    """Code of repack_k(kind, raw, off, row_bytes, n_valid, w, wo, dsc, so, dmm, mo): the
    super-block at byte off of 16 rows as 64 vectors of 4 unsigned quants per row lane (weights
    4i..4i+3 in vector i) at w[wo:], d * sc_j per row at dsc[so + 16 j:], dmin * m_j at
    dmm[mo + 16 j:]."""

    def codegen(context, builder, sig, args):
        b = builder
        rawp = _data(context, b, sig.args[0], args[0], _I8)
        wp = _data(context, b, sig.args[4], args[4], _I8)
        sp = _data(context, b, sig.args[6], args[6], _F32)
        mp = _data(context, b, sig.args[8], args[8], _F32)
        off, rb, nv, wo, so, mo = (context.cast(b, args[i], sig.args[i], types.int64)
                                   for i in (1, 2, 3, 5, 7, 9))
        lanes = _const16(range(ROWS))
        idx = b.mul(_splat(b, b.trunc(rb, _I32), _V16I32), lanes)
        mask = b.icmp_signed("<", lanes, _splat(b, b.trunc(nv, _I32), _V16I32))
        base = b.gep(rawp, [off])
        cache = {}

        def at(k):
            if k not in cache:
                cache[k] = _gather(b, b.gep(base, [ir.Constant(_I64, k)]), idx, mask)
            return cache[k]

        def put(ptr, start, i, vec, ty):
            p = b.gep(ptr, [b.add(start, ir.Constant(_I64, i))])
            b.store(vec, b.bitcast(p, ty.as_pointer()), align=1)

        vec, scales = k_weights(b, kind, at)
        for j in range(QK_K // SUB[kind]):
            dv, mv = scales(j)
            put(sp, so, 16 * j, dv, _V16F32)
            if mv is not None:
                put(mp, mo, 16 * j, mv, _V16F32)
        for i in range(K_VECTORS):
            put(wp, wo, 64 * i, vec(i), _V16I32)
        return context.get_dummy_value()

    return codegen


def _tile_k(kind: int):
    """Code of tile_k(kind, w, dsc, dmm, xq, xd, xs32, xs16, n_sb, padded, t0, out): out[16 t +
    r] for the 16 repacked rows and tokens t0 .. t0 + TILE_TOKENS of the block-major Q8_K x."""
    sub, mins = SUB[kind], K_MINS[kind]
    groups, n_sub = sub // 4, QK_K // sub

    def body(b, sb, accs, ptrs, padded, t0, fma):
        wp, sp, mp, qp, xdp, s32p, s16p = ptrs
        i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
        slot0 = b.add(b.mul(sb, padded), t0)
        slots = [b.add(slot0, i64(t)) for t in range(TILE_TOKENS)]
        part = [_ZERO_F] * TILE_TOKENS  # this super-block's sum, before x's scale
        for j in range(n_sub):
            wv = [b.load(b.gep(wp, [b.add(b.mul(sb, i64(K_VECTORS)), i64(groups * j + i))]),
                         align=1) for i in range(groups)]
            dv = b.load(b.gep(sp, [b.add(b.mul(sb, i64(n_sub)), i64(j))]), align=4)
            mv = (b.load(b.gep(mp, [b.add(b.mul(sb, i64(n_sub)), i64(j))]), align=4)
                  if mins else None)
            part = [k_fma(b, fma, k_dot(b, kind, wv, j, slots[t], qp, s16p), dv, mv, j,
                          slots[t], s32p, part[t]) for t in range(TILE_TOKENS)]
        new = []
        for t in range(TILE_TOKENS):
            xd = _splat(b, b.load(b.gep(xdp, [slots[t]]), align=4), _V16F32)
            new.append(b.call(fma, [part[t], xd, accs[t]]))
        return new

    def codegen(context, builder, sig, args):
        elems = (_V16I32, _V16F32, _V16F32, _I32, _F32, _F32, _I32)
        return _tile_loop(context, builder, sig, args, elems, "tilek", body)

    return codegen


@njit(cache=True, inline="always")
def q8k_slot(xs, padded, s, xq, xd, xs32, xs16):
    """Block-major slot s (super-block s // padded, token s % padded) of _block_major_q8k."""
    n_tokens = xs.shape[0]
    sb, t = s // padded, s % padded
    if t >= n_tokens:
        for k in range(QK_K):
            xq[s * QK_K + k] = 0
        xd[s] = 0
        for j in range(N_SUB32):
            xs32[s * N_SUB32 + j] = 0
        for j in range(N_SUB16):
            xs16[s * N_SUB16 + j] = 0
        return
    lo = sb * QK_K
    iscale = q8_k_iscale(xs[t], lo, QK_K)
    xd[s] = np.float32(1.0) / iscale if iscale != 0 else np.float32(0.0)
    for j in range(N_SUB16):
        total = 0
        for k in range(16):
            q = q8_k_quant(iscale, xs[t, lo + 16 * j + k])
            xq[s * QK_K + 16 * j + k] = q
            total += q
        xs16[s * N_SUB16 + j] = -32 * total
        if j % 2 == 0:
            xs32[s * N_SUB32 + j // 2] = np.float32(-total)
        else:
            xs32[s * N_SUB32 + j // 2] -= np.float32(total)


@njit(cache=True, parallel=True)
def _block_major_q8k(xs, padded, xq, xd, xs32, xs16):
    """xs (n_tokens, n_cols) -> Q8_K x block-major by super-block, tokens padded with zeros:
    xq int8 (n_sb * padded * 256,) natural order, xd (n_sb * padded,), xs32 -sum per 32
    (float), xs16 -32 * sum per 16 (int32): quantize_row_q8_K_ref's integers and d."""
    n_sb = xs.shape[1] // QK_K
    for s in prange(n_sb * padded):
        q8k_slot(xs, padded, s, xq, xd, xs32, xs16)


@intrinsic
def repack_k(typingctx, kind, raw, off, row_bytes, n_valid, w, wo, dsc, so, dmm, mo):
    return _by_kind(_repack_k, K_KINDS, kind, (raw, off, row_bytes, n_valid, w, wo, dsc, so, dmm,
                                               mo))


@intrinsic
def tile_k(typingctx, kind, w, dsc, dmm, xq, xd, xs32, xs16, n_sb, padded, t0, out):
    return _by_kind(_tile_k, K_KINDS, kind, (w, dsc, dmm, xq, xd, xs32, xs16, n_sb, padded, t0,
                                             out))


def _compile_k(kind: int):
    ts, n_sub = LAYOUTS[T(kind)].type_size, QK_K // SUB[kind]

    @njit(cache=True, parallel=True)
    def matmul(raw, xq, xd, xs32, xs16, ys):
        n_tokens, n_rows = ys.shape
        row_bytes = raw.shape[1]
        n_sb = row_bytes // ts
        padded = xd.shape[0] // n_sb
        flat = raw.reshape(-1)
        for g in prange((n_rows + ROWS - 1) // ROWS):
            r0 = g * ROWS
            prefetch_group(flat, r0, n_rows, row_bytes)
            prefetch_group(flat, r0 + ROWS, n_rows, row_bytes)
            n_valid = min(ROWS, n_rows - r0)
            w = np.empty(n_sb * QK_K * ROWS + 64, np.uint8)
            w = w[(64 - w.ctypes.data % 64) % 64 :]
            dsc = np.empty(n_sb * n_sub * ROWS, np.float32)
            dmm = np.empty(n_sb * n_sub * ROWS, np.float32)
            for s in range(n_sb):
                repack_k(kind, flat, r0 * row_bytes + s * ts, row_bytes, n_valid, w,
                         s * QK_K * ROWS, dsc, s * n_sub * ROWS, dmm, s * n_sub * ROWS)
            out = np.empty(TILE_TOKENS * ROWS, np.float32)
            for t0 in range(0, padded, TILE_TOKENS):
                tile_k(kind, w, dsc, dmm, xq, xd, xs32, xs16, n_sb, padded, t0, out)
                for t in range(min(TILE_TOKENS, n_tokens - t0)):
                    for r in range(n_valid):
                        ys[t0 + t, r0 + r] = out[t * ROWS + r]

    return matmul


def matmul_k(kind: int, raw: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """ys (n_tokens, n_rows) = xs @ W.T for a Q4_K / Q5_K / Q6_K matrix, x as Q8_K."""
    fn = _KERNELS.get(kind)
    if fn is None:
        fn = _KERNELS[kind] = _compile_k(kind)
    n_tokens, n_cols = xs.shape
    padded = -(-n_tokens // TILE_TOKENS) * TILE_TOKENS
    n_slots = n_cols // QK_K * padded
    xq = np.empty(n_slots * QK_K, np.int8)  # block-major (n_sb, padded, 256)
    xd = np.empty(n_slots, np.float32)
    xs32 = np.empty(n_slots * N_SUB32, np.float32)
    xs16 = np.empty(n_slots * N_SUB16, np.int32)
    _block_major_q8k(np.ascontiguousarray(xs, np.float32), padded, xq, xd, xs32, xs16)
    ys = np.empty((n_tokens, raw.shape[0]), np.float32)  # (n_tokens, n_rows)
    fn(raw, xq, xd, xs32, xs16, ys)
    return ys
