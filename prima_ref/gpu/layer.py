"""A transformer layer wholly on the GPU: raw GGUF weight blocks uploaded once, a GPU-resident
KV cache, every op a kernel of prima_ref.gpu.kernels. Same call shape as Transformer._layer:
layer(x (n_tok, n_embd) float32, positions (n_tok,)) -> (n_tok, n_embd) float32.
"""

from __future__ import annotations

import os

import numpy as np
from numba import cuda

from prima_ref.gpu import kernels as K
from prima_ref.model.config import ROPE_NEOX, ModelConfig

# Product kernels: by default a thread per 32-weight block (kernels.PRODUCTS_BY_ITEM), the ones
# checked on an H200; PRIMA_GPU_PRODUCTS=coalesced picks kernels.PRODUCTS (a lane per weight,
# coalesced reads), checked only under numba's CUDA simulator so far (reports/gpu.md).
_BY_ITEM = os.environ.get("PRIMA_GPU_PRODUCTS", "item") != "coalesced"


class GpuUnsupportedError(ValueError):
    pass


def _blocks(n: int, per: int) -> int:
    return (n + per - 1) // per


class Workspace:
    """Device buffers reused across calls (numba allocates with cudaMalloc each time); one per
    process, shared by the layers, which run one after another."""

    def __init__(self):
        self._bufs: dict[str, object] = {}
        self.lut = cuda.to_device(K.f16_table())
        from prima_ref.model.ops import _GELU_TABLE_F16

        self.gelu = cuda.to_device(_GELU_TABLE_F16.astype(np.float32))

    def get(self, tag: str, shape: tuple, dtype=np.float32):
        buf = self._bufs.get(tag)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != np.dtype(dtype):
            buf = cuda.device_array(shape, dtype=dtype)
            self._bufs[tag] = buf
        return buf


class Activation:
    """A device activation (n_tok, n) and its int8 forms, each computed once when a product
    first needs it: 'q8' (Q8_0/Q8_1 of the legacy types) and 'q8k' (Q8_K of the K-quants)."""

    def __init__(self, ws: Workspace, tag: str, x):
        self.ws, self.tag, self.x = ws, tag, x
        self._q: dict[str, tuple] = {}

    def q8(self):
        if "q8" not in self._q:
            n_tok, n = self.x.shape
            if n % K.QK:
                raise GpuUnsupportedError(f"int8 activations need a multiple of 32 values, got {n}")
            qx = self.ws.get(self.tag + ".qx", (n_tok, n), np.int8)
            dx = self.ws.get(self.tag + ".dx", (n_tok, n // K.QK))
            dsx = self.ws.get(self.tag + ".dsx", (n_tok, n // K.QK))
            grid = (_blocks(n // K.QK, 64), n_tok)
            K.quantize_q8_kernel[grid, 64](self.x, qx, dx, dsx, self.ws.lut)
            self._q["q8"] = (qx, dx, dsx)
        return self._q["q8"]

    def q8k(self):
        if "q8k" not in self._q:
            n_tok, n = self.x.shape
            if n % K.QK_K:
                raise GpuUnsupportedError(f"Q8_K activations need a multiple of 256 values, "
                                          f"got {n}")
            qx = self.ws.get(self.tag + ".qxk", (n_tok, n), np.int8)
            xd = self.ws.get(self.tag + ".xdk", (n_tok, n // K.QK))
            K.quantize_q8k_kernel[(_blocks(n // K.QK_K, 32), n_tok), 32](self.x, qx, xd)
            self._q["q8k"] = (qx, xd, xd)
        return self._q["q8k"]


class GpuWeight:
    """One matrix as its raw GGUF bytes on the device; y = x @ W.T."""

    def __init__(self, name: str, qtype: int, rows: np.ndarray):
        qtype = int(qtype)
        if qtype not in K.QUANTIZED + (K.F32, K.F16):
            raise GpuUnsupportedError(f"{name}: tensor type {qtype} has no GPU kernel (GPU types: "
                                      "F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K)")
        self.name, self.qtype = name, qtype
        self.n_rows, self.row_bytes = rows.shape
        if qtype == K.F32:
            self.n_cols = self.row_bytes // 4
            self.dev = cuda.to_device(np.ascontiguousarray(rows).view(np.float32))
        elif qtype == K.F16:
            self.n_cols = self.row_bytes // 2
            self.dev = cuda.to_device(np.ascontiguousarray(rows).view(np.uint16))
        else:
            bb, bw = K.BLOCK_BYTES[qtype], K.BLOCK_WEIGHTS[qtype]
            if self.row_bytes % bb:
                raise GpuUnsupportedError(f"{name}: a row of {self.row_bytes} bytes is not "
                                          "whole blocks")
            self.n_cols = self.row_bytes // bb * bw
            self.dev = cuda.to_device(np.ascontiguousarray(rows).reshape(-1))
        self.nbytes = rows.nbytes

    def __call__(self, act: Activation, out_tag: str, table: dict | None = None):
        n_tok = act.x.shape[0]
        if act.x.shape[1] != self.n_cols:
            raise GpuUnsupportedError(f"{self.name}: x has {act.x.shape[1]} columns, "
                                      f"W has {self.n_cols}")
        ys = act.ws.get(out_tag, (n_tok, self.n_rows))
        grid = (self.n_rows, _blocks(n_tok, K.TOKEN_TILE))
        if self.qtype == K.F32:
            K.f32_products_kernel[grid, K.PRODUCT_THREADS](self.dev, act.x, ys)
        elif self.qtype == K.F16:
            K.f16_products_kernel[grid, K.PRODUCT_THREADS](self.dev, act.x, act.ws.lut, ys)
        else:
            qx, xd, xoff = act.q8k() if self.qtype in K.K_QUANTS else act.q8()
            args = (self.dev, self.row_bytes, qx, xd, xoff, act.ws.lut, ys)
            if table is None:
                table = K.PRODUCTS_BY_ITEM if _BY_ITEM else K.PRODUCTS
            table[self.qtype][grid, K.PRODUCT_THREADS](*args)
        return ys


_WS: Workspace | None = None


def workspace() -> Workspace:
    global _WS
    if _WS is None:
        _WS = Workspace()
    return _WS


def layer_bytes(model, cfg: ModelConfig, il: int, n_ctx: int) -> int:
    """Device bytes a layer takes: its tensors plus its float32 KV cache."""
    prefix = f"blk.{il}."
    weights = sum(info.n_bytes for name, info in model.tensors.items() if name.startswith(prefix))
    return int(weights + 2 * 4 * n_ctx * cfg.n_head_kv * cfg.head_dim)


def _row_major(weight) -> np.ndarray:
    """The matrix's rows as the GPU kernels read them: a repacked one's unpacked (a copy)."""
    if not weight.packed:
        return weight.rows
    from prima_ref.quants import lanes
    from prima_ref.quants.legacy import BLOCK_BYTES

    return lanes.unpack(weight.rows, BLOCK_BYTES[weight.qtype])


class GpuLayer:
    """Layer il on the GPU, built from the CPU Layer's zero-copy weight views."""

    def __init__(self, model, cfg: ModelConfig, il: int, layer, n_ctx: int):
        if cfg.head_dim > K.MAX_HEAD_DIM:
            raise GpuUnsupportedError(f"head_dim {cfg.head_dim} > {K.MAX_HEAD_DIM}")
        self.cfg, self.il, self.n_ctx = cfg, il, n_ctx
        self.ws = workspace()
        up = lambda wt: GpuWeight(wt.name, wt.qtype, _row_major(wt))  # noqa: E731
        self.wq, self.wk, self.wv, self.wo = up(layer.wq), up(layer.wk), up(layer.wv), up(layer.wo)
        self.w_gate, self.w_up, self.w_down = up(layer.w_gate), up(layer.w_up), up(layer.w_down)
        vec = lambda a: None if a is None else cuda.to_device(np.ascontiguousarray(a, np.float32))  # noqa: E731
        self.attn_norm, self.ffn_norm = vec(layer.attn_norm), vec(layer.ffn_norm)
        self.bq, self.bk, self.bv = vec(layer.bq), vec(layer.bk), vec(layer.bv)
        self.q_norm, self.k_norm = vec(layer.q_norm), vec(layer.k_norm)
        self.post_attn_norm = vec(layer.post_attn_norm)
        self.post_ffn_norm = vec(layer.post_ffn_norm)
        kv_shape = (n_ctx, cfg.n_head_kv, cfg.head_dim)
        self.k_cache = cuda.to_device(np.zeros(kv_shape, np.float32))
        self.v_cache = cuda.to_device(np.zeros(kv_shape, np.float32))
        base, scale = cfg.layer_rope(il)
        self.theta_scale = np.float32(base ** (-2.0 / cfg.n_rot))
        self.freq_scale = np.float32(scale)
        self.eps = np.float32(cfg.norm_eps)
        self.trace: dict | None = None  # set to {} to keep host copies of each stage (debugging)
        self.nbytes = sum(w.nbytes for w in (self.wq, self.wk, self.wv, self.wo, self.w_gate,
                                             self.w_up, self.w_down)) + 2 * self.k_cache.nbytes

    # -- pieces ---------------------------------------------------------------------------------

    def _norm(self, x, weight, tag):
        out = self.ws.get(tag, x.shape)
        K.rms_norm_kernel[x.shape[0], K.NORM_THREADS](x, weight, self.eps, out)
        return out

    def _ew(self, n: int) -> int:
        return _blocks(n, K.EW_THREADS)

    def _add(self, a, b, tag):
        out = self.ws.get(tag, a.shape)
        K.add_kernel[self._ew(a.size), K.EW_THREADS](a, b, out)
        return out

    def _heads(self, y, n_head):
        """(n_tok, n_head * d), or (n_tok * n_head, d) after a per-head norm, -> (n_tok, n_head,
        d) view."""
        d = self.cfg.head_dim
        return y.reshape(y.size // (n_head * d), n_head, d)

    def _rope(self, x, pos):
        n = x.shape[0] * x.shape[1] * (self.cfg.n_rot // 2)
        K.rope_kernel[self._ew(n), K.EW_THREADS](x, pos, self.cfg.n_rot, self.theta_scale,
                                                 self.freq_scale, self.cfg.rope_type == ROPE_NEOX)

    # -- the layer ------------------------------------------------------------------------------

    def _keep(self, name, a):
        if self.trace is not None:
            self.trace[name] = a.copy_to_host()

    def forward_device(self, x, pos, n_max_pos: int):
        """x device (n_tok, n_embd), pos device int64 (n_tok,) -> device (n_tok, n_embd)."""
        cfg, ws = self.cfg, self.ws
        keep = self._keep
        n_tok = x.shape[0]
        h = Activation(ws, "h", self._norm(x, self.attn_norm, "h"))
        keep("h", h.x)
        q, k, v = self.wq(h, "q"), self.wk(h, "k"), self.wv(h, "v")
        if self.bq is not None:
            for y, b in ((q, self.bq), (k, self.bk), (v, self.bv)):
                K.add_bias_kernel[self._ew(y.size), K.EW_THREADS](y, b)
        keep("q0", q)  # the products plus biases, as the CPU trace (bench/gpu.py cpu_stages)
        keep("k0", k)
        keep("v0", v)
        if cfg.qk_norm:
            q = self._norm(q.reshape(n_tok * cfg.n_head, cfg.head_dim), self.q_norm, "qn")
            k = self._norm(k.reshape(n_tok * cfg.n_head_kv, cfg.head_dim), self.k_norm, "kn")
        q = self._heads(q, cfg.n_head)
        k, v = self._heads(k, cfg.n_head_kv), self._heads(v, cfg.n_head_kv)
        self._rope(q, pos)
        self._rope(k, pos)
        keep("q", q)
        keep("k", k)
        K.kv_store_kernel[self._ew(k.size), K.EW_THREADS](k, v, pos, self.k_cache, self.v_cache,
                                                          ws.lut)
        att = ws.get("att", q.shape)
        window = cfg.n_swa if cfg.is_swa(self.il) else 0
        K.attention_kernel[(n_tok, cfg.n_head), K.ATTN_THREADS](
            q, self.k_cache, self.v_cache, pos, window, float(np.float32(cfg.attn_scale)),
            float(np.float32(cfg.attn_softcap)), att)
        keep("att", att)
        out = self.wo(Activation(ws, "att", att.reshape(n_tok, cfg.n_head * cfg.head_dim)), "o")
        keep("o", out)
        if cfg.post_norms:
            out = self._norm(out, self.post_attn_norm, "on")
        x = self._add(x, out, "x2")
        h = Activation(ws, "h2", self._norm(x, self.ffn_norm, "h2"))
        keep("h2", h.x)
        gate, up = self.w_gate(h, "gate"), self.w_up(h, "up")
        keep("gate0", gate)
        keep("up", up)
        if cfg.ffn_act == "gelu":
            K.gelu_mul_kernel[self._ew(gate.size), K.EW_THREADS](gate, up, ws.gelu, ws.lut)
        else:
            K.silu_mul_kernel[self._ew(gate.size), K.EW_THREADS](gate, up)
        keep("act", gate)
        out = self.w_down(Activation(ws, "act", gate), "down")
        keep("down", out)
        if cfg.post_norms:
            out = self._norm(out, self.post_ffn_norm, "dn")
        return self._add(x, out, "x3")

    def __call__(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        if positions.max() >= self.n_ctx:
            raise ValueError(f"position {positions.max()} is past the GPU cache's {self.n_ctx}")
        xd = self.ws.get("x_in", x.shape)
        xd.copy_to_device(np.ascontiguousarray(x, np.float32))
        pd = self.ws.get("pos", positions.shape, np.int64)
        pd.copy_to_device(positions)
        return self.forward_device(xd, pd, int(positions.max())).copy_to_host()

    def kv_remove(self, p0: int = 0, p1: int | None = None) -> None:
        p1 = self.n_ctx if p1 is None else min(p1, self.n_ctx)
        if p1 > p0:
            n = (p1 - p0) * self.cfg.n_head_kv * self.cfg.head_dim
            K.kv_clear_kernel[self._ew(n), K.EW_THREADS](self.k_cache, self.v_cache, p0, p1)
