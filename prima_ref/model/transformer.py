"""The transformer forward, split into the steps a ring rank runs: embed, a range of layers,
and the output head. Weights stay zero-copy views of the mapped GGUF file.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from prima_ref.model import ops
from prima_ref.model.config import ModelConfig
from prima_ref.quants import QuantKernels, batched, fused, kernels, lanes, legacy, tiled

_EMPTY_F32 = np.zeros(0, np.float32)  # "no norm" / "no residual" for the fused kernels
_GELU_TABLE_F32 = ops.GELU_TABLE_F32


@dataclass(frozen=True)
class Weight:
    name: str
    kern: QuantKernels
    rows: np.ndarray  # (n_out, row_bytes) uint8 view of the file
    qtype: int = -1
    packed: bool = False  # rows holds lanes.repack()ed bytes (prima_ref.repacked)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (n_tokens, n_in) -> (n_tokens, n_out)."""
        if self.packed:  # bit-equal to every path below
            return self.packed_product(x)
        if x.shape[0] == 1:
            return self.kern.matvec(self.rows, x[0])[None, :]
        if _few_rows(x) and self.qtype in batched.LEGACY_KINDS:
            return batched.group(self.qtype, (_readonly(self.rows),), _c(x))
        if _rows_alone():
            return np.stack([self.kern.matvec(self.rows, row) for row in x])
        return self.kern.matmul(self.rows, x)

    @property
    def fusable(self) -> bool:
        return self.qtype in fused.FUSABLE_KINDS

    def packed_product(self, x: np.ndarray, act=None) -> np.ndarray:
        """A repacked matrix times x (n_tokens, n_in): prefill's tiles over the repacked
        layout above TILED_MIN_TOKENS (act: x's prepare_activations, when made already), else
        the lanes kernels, 8 tokens a pass."""
        if x.shape[0] > legacy.TILED_MIN_TOKENS and tiled.enabled():
            act = legacy.prepare_activations(x) if act is None else act
            return tiled.matmul(self.qtype, self.rows, act, packed=True)
        return lanes.matmul_packed(self.qtype, self.rows, x)

    @property
    def kind(self) -> int:
        """The decode kernels' kind: the ggml type, + lanes.PACKED over repacked bytes."""
        return self.qtype + lanes.PACKED if self.packed else self.qtype


_PRODUCTS = threading.local()  # per thread: a server may verify and prefill at once


def _rows_alone() -> bool:
    return getattr(_PRODUCTS, "row_by_row", False)


@contextmanager
def row_by_row():
    """Within this block (this thread) every product takes its rows one at a time (matvec), so
    each row of a batch is bit-equal to a one-token pass; the batched matmul of some types sums
    in another order. Speculative verification uses it to reproduce single-token decoding."""
    saved = getattr(_PRODUCTS, "row_by_row", False)
    _PRODUCTS.row_by_row = True
    try:
        yield
    finally:
        _PRODUCTS.row_by_row = saved


class MissingTensorError(ValueError):
    pass


def weight(model, name: str, shape: tuple[int, int] | None = None) -> Weight:
    """A matrix; shape is (n_out, n_in) as the config implies, checked against the file."""
    info = model.tensors[name]
    if shape is not None and (info.n_rows, info.n_cols) != shape:
        raise MissingTensorError(f"{name} has shape {(info.n_rows, info.n_cols)}, the model's "
                                 f"hyper-parameters imply {shape}")
    return Weight(name, kernels(info.qtype), model.tensor_rows(name), int(info.qtype),
                  name in model.packed)


def _few_rows(x: np.ndarray) -> bool:
    """2..batched.MAX_ROWS rows: a decode step of several slots, for the batched kernels (each
    row bit-equal to a one-row pass, so row_by_row holds too)."""
    return 2 <= x.shape[0] <= batched.MAX_ROWS


def _c(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _batch_kind(weights) -> int | None:
    """The legacy type all weights share, which the batched kernels take in one call."""
    kinds = {w.kind for w in weights}
    legacy_kinds = all(w.qtype in batched.LEGACY_KINDS for w in weights)
    return kinds.pop() if len(kinds) == 1 and legacy_kinds else None


def _products(weights: tuple[Weight, ...], h: np.ndarray) -> list[np.ndarray]:
    """Each weight times h (n_tokens, n_in); legacy-quant matrices share one int8 activation
    preparation in prefill (the same floats as preparing it per matrix)."""
    if _few_rows(h):
        return [w(h) for w in weights]
    if h.shape[0] > 1 and all(w.fusable for w in weights) and not _rows_alone():
        act = legacy.prepare_activations(h)
        return [w.packed_product(h, act) if w.packed
                else legacy.matmul_prepared(w.qtype, w.rows, act) for w in weights]
    return [w(h) for w in weights]


def select_logit_rows(x: np.ndarray, last_only: bool, rows) -> np.ndarray:
    """The hidden rows whose logits a forward returns: the last, those listed, or all."""
    if last_only:
        return x[-1:]
    return x if rows is None else x[np.asarray(rows, dtype=np.int64)]


def _readonly(rows: np.ndarray) -> np.ndarray:
    """The same bytes as a read-only view: the fused kernels take tuples of matrices, which
    Numba types as one array type only when their flags agree."""
    view = rows.view()
    view.flags.writeable = False
    return view


class DecodePlan:
    """How one layer's decode step (one token) runs: q/k/v, RoPE, the KV store and attention
    in one call (fused.attention_step) where q/k/v are legacy quants; gate/up and the
    activation in one fused call; W_o and W_down with their residual add (and gemma3's
    post-norm) inside the product, legacy or K-quant; the plain kernels elsewhere."""

    def __init__(self, layer: "Layer", cfg: ModelConfig, il: int):
        qkv = (layer.wq, layer.wk, layer.wv)
        self.qkv = tuple(_readonly(w.rows) for w in qkv) if all(w.fusable for w in qkv) else None
        self.qkv_kinds = np.array([w.kind for w in qkv], np.int64)
        self.qkv_split = tuple(int(v) for v in np.cumsum([w.rows.shape[0] for w in qkv])[:2])
        biases = (layer.bq, layer.bk, layer.bv)
        self.bias = (np.concatenate(biases).astype(np.float32) if layer.bq is not None
                     else _EMPTY_F32)  # bq|bk|bv
        self.q_norm = _EMPTY_F32 if layer.q_norm is None else layer.q_norm
        self.k_norm = _EMPTY_F32 if layer.k_norm is None else layer.k_norm
        self.rope_base, self.rope_scale = cfg.layer_rope(il)
        self.window = cfg.n_swa if cfg.is_swa(il) else 0
        self.wo = (_readonly(layer.wo.rows),) if layer.wo.fusable else None
        self.wo_kinds = np.array([layer.wo.kind], np.int64)
        self.ffn = layer.w_gate.fusable and layer.w_up.fusable
        self.gate_rows, self.up_rows = _readonly(layer.w_gate.rows), _readonly(layer.w_up.rows)
        self.gate_kind, self.up_kind = layer.w_gate.kind, layer.w_up.kind
        self.down = (_readonly(layer.w_down.rows),) if layer.w_down.fusable else None
        self.down_kinds = np.array([layer.w_down.kind], np.int64)
        self.wo_kq = layer.wo.qtype in fused.KQ_FUSABLE_KINDS
        self.wo_rows, self.down_rows = _readonly(layer.wo.rows), _readonly(layer.w_down.rows)
        self.down_kq = layer.w_down.qtype in fused.KQ_FUSABLE_KINDS
        self.post_attn = _EMPTY_F32 if layer.post_attn_norm is None else layer.post_attn_norm
        self.post_ffn = _EMPTY_F32 if layer.post_ffn_norm is None else layer.post_ffn_norm
        self.act = fused.ACT_GELU if cfg.ffn_act == "gelu" else fused.ACT_SILU
        self.eps = np.float32(cfg.norm_eps)


class BatchPlan:
    """How one layer's decode step of 2..batched.MAX_ROWS rows (one token per server slot)
    multiplies its matrices: DecodePlan's fusion with the batched kernels, each weight block
    read once for all rows. A kind is None where the matrices do not share a legacy type;
    those products go one matrix at a time (Weight.__call__)."""

    def __init__(self, layer: "Layer"):
        qkv = (layer.wq, layer.wk, layer.wv)
        self.qkv = _batch_kind(qkv)
        self.qkv_rows = tuple(_readonly(w.rows) for w in qkv)
        self.wo = _batch_kind((layer.wo,))
        self.wo_rows = (_readonly(layer.wo.rows),)
        self.ffn = _batch_kind((layer.w_gate, layer.w_up))
        self.down = _batch_kind((layer.w_down,))
        self.down_rows = (_readonly(layer.w_down.rows),)

    @property
    def complete(self) -> bool:
        return None not in (self.qkv, self.wo, self.ffn, self.down)


def _vector(model, name: str) -> np.ndarray:
    """A small 1-D tensor (norm weight, bias) as float32."""
    return kernels(model.tensors[name].qtype).dequantize(model.tensor_rows(name)).reshape(-1)


class Layer:
    """One block's weights: attention and feed-forward, plus the optional extras per arch."""

    def __init__(self, model, cfg: ModelConfig, il: int):
        p = f"blk.{il}."
        need = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                "ffn_gate", "ffn_up", "ffn_down"]
        if cfg.qk_norm:
            need += ["attn_q_norm", "attn_k_norm"]
        if cfg.post_norms:
            need += ["post_attention_norm", "post_ffw_norm"]
        missing = [n for n in need if p + n + ".weight" not in model.tensors]
        if missing:
            raise MissingTensorError(f"{cfg.arch} layer {il} lacks tensors: {', '.join(missing)}")
        self.attn_norm = _vector(model, p + "attn_norm.weight")
        self.ffn_norm = _vector(model, p + "ffn_norm.weight")
        q_dim, kv_dim, e, f = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim, cfg.n_embd, cfg.n_ff
        self.wq = weight(model, p + "attn_q.weight", (q_dim, e))
        self.wk = weight(model, p + "attn_k.weight", (kv_dim, e))
        self.wv = weight(model, p + "attn_v.weight", (kv_dim, e))
        self.wo = weight(model, p + "attn_output.weight", (e, q_dim))
        self.w_gate = weight(model, p + "ffn_gate.weight", (f, e))
        self.w_up = weight(model, p + "ffn_up.weight", (f, e))
        self.w_down = weight(model, p + "ffn_down.weight", (e, f))
        bias = lambda n: _vector(model, p + n + ".bias") if p + n + ".bias" in model.tensors else None  # noqa: E731
        self.bq, self.bk, self.bv = bias("attn_q"), bias("attn_k"), bias("attn_v")
        self.q_norm = _vector(model, p + "attn_q_norm.weight") if cfg.qk_norm else None
        self.k_norm = _vector(model, p + "attn_k_norm.weight") if cfg.qk_norm else None
        self.post_attn_norm = _vector(model, p + "post_attention_norm.weight") if cfg.post_norms else None
        self.post_ffn_norm = _vector(model, p + "post_ffw_norm.weight") if cfg.post_norms else None
        self.decode = DecodePlan(self, cfg, il)
        self.batch = BatchPlan(self)


class KVCache:
    """Keys and values of one layer for n_slots sequences of n_ctx positions each: row
    slot * n_ctx + p holds position p of that slot. Values are rounded to f16 precision on the
    way in, as llama.cpp stores its cache in f16."""

    def __init__(self, n_ctx: int, n_head_kv: int, head_dim: int, f16: bool = True, n_slots: int = 1):
        self.n_ctx, self.n_slots = n_ctx, n_slots
        self.k = np.zeros((n_slots * n_ctx, n_head_kv, head_dim), dtype=np.float32)
        self.v = np.zeros((n_slots * n_ctx, n_head_kv, head_dim), dtype=np.float32)
        self.f16 = f16

    def rows(self, positions: np.ndarray, slots: np.ndarray | None = None) -> np.ndarray:
        return positions if slots is None else slots * self.n_ctx + positions

    def store(self, positions: np.ndarray, k: np.ndarray, v: np.ndarray,
              slots: np.ndarray | None = None) -> None:
        if self.f16:
            k = k.astype(np.float16).astype(np.float32)
            v = v.astype(np.float16).astype(np.float32)
        rows = self.rows(positions, slots)
        self.k[rows] = k
        self.v[rows] = v

    def remove(self, p0: int = 0, p1: int | None = None, slot: int = 0) -> None:
        base = slot * self.n_ctx
        end = base + (self.n_ctx if p1 is None else min(p1, self.n_ctx))
        self.k[base + p0 : end] = 0.0
        self.v[base + p0 : end] = 0.0


class ContextFullError(ValueError):
    pass


def _layer_set(layers: Iterable[int], n_layer: int) -> range | tuple[int, ...]:
    if isinstance(layers, range):
        ids = layers
    else:
        ids = tuple(sorted(set(int(il) for il in layers)))
    bad = [il for il in ids if not 0 <= il < n_layer]
    if bad:
        raise ValueError(f"layer ids {bad} are outside the model's 0..{n_layer - 1}")
    return ids


class Transformer:
    """Holds the weights of some layers (plus embedding/head when asked) and their KV.

    `layers` is any set of layer ids: a range, or the disjoint windows a ring rank holds when a
    token goes round the ring k times (e.g. [0, 1, 2, 10, 11, 12])."""

    def __init__(self, model, n_ctx: int, layers: Iterable[int] | None = None, head: bool = True,
                 kv_f16: bool = True, n_slots: int = 1, gpu_layers: int = 0,
                 gpu_mem_gib: float | None = None):
        """n_ctx positions for each of n_slots independent sequences (server requests); the
        last gpu_layers of each window run on a CUDA GPU when one exists (prima_ref.gpu)."""
        self.cfg = cfg = ModelConfig.from_gguf(model)
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self.n_ctx, self.n_slots = n_ctx, n_slots
        self.layer_ids = range(cfg.n_layer) if layers is None else _layer_set(layers, cfg.n_layer)
        self.layers = {il: Layer(model, cfg, il) for il in self.layer_ids}
        self.kv = {il: KVCache(n_ctx, cfg.n_head_kv, cfg.head_dim, kv_f16, n_slots)
                   for il in self.layer_ids}
        self.gpu = {}  # layer id -> GpuLayer: the last gpu_layers of each window (prima_ref.gpu)
        if gpu_layers > 0:
            if n_slots > 1:
                raise ValueError("GPU layers keep one sequence's KV cache: use -np 1 with -ngl")
            from prima_ref.gpu import offload_layers

            self.gpu = offload_layers(model, cfg, self.layers, n_ctx, gpu_layers, gpu_mem_gib)
        if head:
            self.tok_embd = weight(model, "token_embd.weight")
            self.output_norm = _vector(model, "output_norm.weight")
            out_name = "token_embd.weight" if cfg.tied_output else "output.weight"
            self.output = weight(model, out_name)
            fusable = self.output.fusable or self.output.qtype in fused.KQ_FUSABLE_KINDS
            self._head = (_readonly(self.output.rows),) if fusable else None
            self._head_kinds = np.array([self.output.kind], np.int64)

    # -- input ---------------------------------------------------------------------------------

    def embed(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.tok_embd.rows.shape[0]):
            raise ValueError(f"token id out of range 0..{self.tok_embd.rows.shape[0] - 1}")
        x = self.tok_embd.kern.dequantize(self.tok_embd.rows[tokens])  # (n_tokens, n_embd)
        if self.cfg.embed_scale != 1.0:
            x *= np.float32(self.cfg.embed_scale)
        return x

    # -- layers --------------------------------------------------------------------------------

    def forward_layers(self, x: np.ndarray, positions: np.ndarray, first: int, last: int,
                       slots: np.ndarray | None = None) -> np.ndarray:
        """Run layers first..last-1 on x (n_tokens, n_embd) at the given positions; row t
        belongs to sequence slots[t] (None: every row to slot 0)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.max() >= self.n_ctx:
            raise ContextFullError(f"position {positions.max()} is past the context size {self.n_ctx}")
        if slots is not None:
            slots = np.asarray(slots, dtype=np.int64)
            if slots.shape != positions.shape or slots.min() < 0 or slots.max() >= self.n_slots:
                raise ValueError(f"slot ids must be one per token in 0..{self.n_slots - 1}")
            if not slots.any():
                slots = None  # all in slot 0: the single-sequence path
        missing = [il for il in range(first, last) if il not in self.layers]
        if missing:
            raise ValueError(f"layers {missing} are not held here (held: {list(self.layer_ids)})")
        for il in range(first, last):
            # with GPU layers there is one slot, so every row's slot is 0
            x = self.gpu[il](x, positions) if il in self.gpu else self._layer(il, x, positions, slots)
        return x

    def kv_remove(self, p0: int = 0, p1: int | None = None, slot: int = 0) -> None:
        """Forget cached positions [p0, p1) of one slot in every held layer (None: to the end)."""
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} outside 0..{self.n_slots - 1}")
        for cache in self.kv.values():
            cache.remove(p0, p1, slot)
        for gpu_layer in self.gpu.values():
            gpu_layer.kv_remove(p0, p1)

    def _norm(self, x, weight):
        out = np.empty_like(x)
        ops.rms_norm(x, weight, np.float32(self.cfg.norm_eps), out)
        return out

    def _qkv(self, w: Layer, x: np.ndarray):
        plan = w.decode
        if x.shape[0] == 1 and plan.qkv is not None:
            y = np.empty(plan.qkv_split[1] + w.wv.rows.shape[0], np.float32)
            fused.matvec_group(plan.qkv, plan.qkv_kinds, x[0], w.attn_norm, plan.eps, _EMPTY_F32, y)
            y = y[None, :]
            a, b = plan.qkv_split
            return y[:, :a], y[:, a:b], y[:, b:]
        return _products((w.wq, w.wk, w.wv), self._norm(x, w.attn_norm))

    def _attn_out(self, w: Layer, x: np.ndarray, att: np.ndarray) -> np.ndarray:
        """x + (post-normed) W_o att."""
        plan = w.decode
        if x.shape[0] == 1 and plan.wo is not None and not self.cfg.post_norms:
            y = np.empty_like(x)
            fused.matvec_group(plan.wo, plan.wo_kinds, att[0], _EMPTY_F32, plan.eps, x[0], y[0])
            return y
        if x.shape[0] == 1 and plan.wo_kq:
            y = np.empty_like(x)
            fused.kq_matvec(plan.wo_rows, w.wo.qtype, att[0], _EMPTY_F32, plan.eps, plan.post_attn,
                            x[0], y[0])
            return y
        if _few_rows(x) and w.batch.wo is not None and not self.cfg.post_norms:
            return batched.group(w.batch.wo, w.batch.wo_rows, _c(att), residual=_c(x))
        out = w.wo(att)
        if self.cfg.post_norms:
            out = self._norm(out, w.post_attn_norm)
        return x + out

    def _ffn(self, w: Layer, x: np.ndarray) -> np.ndarray:
        """x + (post-normed) W_down act(W_gate h) * (W_up h), h = ffn_norm(x)."""
        plan = w.decode
        if x.shape[0] == 1 and plan.ffn:
            gate = np.empty((1, w.w_gate.rows.shape[0]), np.float32)
            fused.ffn_gate_up(plan.gate_rows, plan.gate_kind, plan.up_rows, plan.up_kind, x[0],
                              w.ffn_norm, plan.eps, plan.act, _GELU_TABLE_F32, gate[0])
        elif _few_rows(x) and w.batch.ffn is not None:
            gate = batched.gate_up(w.batch.ffn, plan.gate_rows, plan.up_rows, _c(x), w.ffn_norm,
                                   plan.eps, plan.act, _GELU_TABLE_F32)
        else:
            gate, up = _products((w.w_gate, w.w_up), self._norm(x, w.ffn_norm))
            if self.cfg.ffn_act == "gelu":
                ops.gelu_mul(gate, up)
            else:
                ops.silu_mul(gate, up)
        if x.shape[0] == 1 and plan.down is not None and not self.cfg.post_norms:
            y = np.empty_like(x)
            fused.matvec_group(plan.down, plan.down_kinds, gate[0], _EMPTY_F32, plan.eps, x[0], y[0])
            return y
        if x.shape[0] == 1 and plan.down_kq:
            y = np.empty_like(x)
            fused.kq_matvec(plan.down_rows, w.w_down.qtype, gate[0], _EMPTY_F32, plan.eps,
                            plan.post_ffn, x[0], y[0])
            return y
        if _few_rows(x) and w.batch.down is not None and not self.cfg.post_norms:
            return batched.group(w.batch.down, w.batch.down_rows, gate, residual=_c(x))
        out = w.w_down(gate)
        if self.cfg.post_norms:
            out = self._norm(out, w.post_ffn_norm)
        return x + out

    def _attend_one(self, il: int, w: Layer, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x (1, n_embd) -> attention output (1, n_head * head_dim), KV stored: one call."""
        cfg, plan, cache = self.cfg, w.decode, self.kv[il]
        att = np.empty((1, cfg.n_head, cfg.head_dim), np.float32)  # (1, n_head, head_dim)
        fused.attention_step(plan.qkv, plan.qkv_kinds, x[0], w.attn_norm, plan.eps, plan.bias,
                             plan.q_norm, plan.k_norm, positions, cfg.n_rot, plan.rope_base,
                             plan.rope_scale, cfg.rope_type, cache.k, cache.v, cache.f16,
                             plan.window, np.float32(cfg.attn_scale),
                             np.float32(cfg.attn_softcap), att)
        return att.reshape(1, -1)

    def _attend_rows(self, il: int, w: Layer, x: np.ndarray, positions: np.ndarray,
                     slots) -> np.ndarray:
        """x (n, n_embd), 2..batched.MAX_ROWS rows -> attention output (n, n_head * head_dim),
        KV stored: the batched q/k/v products, then one call for the rest of every row."""
        cfg, plan, cache = self.cfg, w.decode, self.kv[il]
        n = x.shape[0]
        y = batched.group(w.batch.qkv, w.batch.qkv_rows, _c(x), w.attn_norm, plan.eps)
        att = np.empty((n, cfg.n_head, cfg.head_dim), np.float32)  # (n, n_head, head_dim)
        row0 = cache.rows(np.zeros(n, np.int64),
                          None if slots is None else np.asarray(slots, np.int64))
        fused.attention_rows(y, plan.bias, plan.q_norm, plan.k_norm, plan.eps,
                             np.asarray(positions, np.int64), row0, cfg.n_rot, plan.rope_base,
                             plan.rope_scale, cfg.rope_type, cache.k, cache.v, cache.f16,
                             plan.window, np.float32(cfg.attn_scale),
                             np.float32(cfg.attn_softcap), att)
        return att.reshape(n, -1)

    def _layer(self, il: int, x: np.ndarray, positions: np.ndarray, slots=None) -> np.ndarray:
        cfg, w = self.cfg, self.layers[il]
        n_tok = x.shape[0]
        if n_tok == 1 and slots is None and w.decode.qkv is not None:
            x = self._attn_out(w, x, self._attend_one(il, w, x, positions))
            return self._ffn(w, x)
        if _few_rows(x) and w.batch.qkv is not None:
            x = self._attn_out(w, x, self._attend_rows(il, w, x, positions, slots))
            return self._ffn(w, x)
        q, k, v = self._qkv(w, x)
        if w.bq is not None:
            q += w.bq
            k += w.bk
            v += w.bv
        q = q.reshape(n_tok, cfg.n_head, cfg.head_dim)  # (n_tokens, n_head, head_dim)
        k = k.reshape(n_tok, cfg.n_head_kv, cfg.head_dim)
        v = v.reshape(n_tok, cfg.n_head_kv, cfg.head_dim)
        if cfg.qk_norm:
            q = self._norm(q.reshape(-1, cfg.head_dim), w.q_norm).reshape(q.shape)
            k = self._norm(k.reshape(-1, cfg.head_dim), w.k_norm).reshape(k.shape)
        base, scale = cfg.layer_rope(il)
        ops.rope_inplace(q, positions, cfg.n_rot, base, scale, cfg.rope_type)
        ops.rope_inplace(k, positions, cfg.n_rot, base, scale, cfg.rope_type)
        cache = self.kv[il]
        cache.store(positions, k, v, slots)
        att = np.empty_like(q)
        window = cfg.n_swa if cfg.is_swa(il) else 0
        ops.attention(q, cache.k, cache.v, positions, window, np.float32(cfg.attn_scale),
                      np.float32(cfg.attn_softcap), att,
                      None if slots is None else cache.rows(np.zeros_like(slots), slots))
        x = self._attn_out(w, x, att.reshape(n_tok, -1))
        return self._ffn(w, x)

    @property
    def batched_decode(self) -> bool:
        """Whether a decode step of 2..batched.MAX_ROWS rows runs every product through the
        batched kernels (each row then bit-equal to a one-row step, and cheaper than one)."""
        head = not hasattr(self, "output") or self.output.qtype in batched.LEGACY_KINDS
        return head and all(layer.batch.complete for layer in self.layers.values()) and not self.gpu

    # -- output --------------------------------------------------------------------------------

    def logits(self, x: np.ndarray) -> np.ndarray:
        """x (n_tokens, n_embd) -> logits (n_tokens, n_vocab)."""
        if x.shape[0] == 1 and self._head is not None:  # decode: norm and head in one call
            out = np.empty((1, self.output.rows.shape[0]), np.float32)  # (1, n_vocab)
            eps = np.float32(self.cfg.norm_eps)
            if self.output.fusable:
                fused.matvec_group(self._head, self._head_kinds, x[0], self.output_norm, eps,
                                   _EMPTY_F32, out[0])
            else:
                fused.kq_matvec(self._head[0], self.output.qtype, x[0], self.output_norm, eps,
                                _EMPTY_F32, _EMPTY_F32, out[0])
        else:
            out = self.output(self._norm(x, self.output_norm))
        if self.cfg.final_softcap > 0:
            c = np.float32(self.cfg.final_softcap)
            out = c * np.tanh(out / c)
        return out

    def forward(self, tokens, start_pos: int, all_logits: bool = False) -> np.ndarray:
        """Whole-model step on one device: logits of the last token (or of all tokens)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        positions = np.arange(start_pos, start_pos + tokens.size, dtype=np.int64)
        x = self.forward_layers(self.embed(tokens), positions, 0, self.cfg.n_layer)
        return self.logits(x if all_logits else x[-1:])

    def forward_rows(self, tokens, positions, slots, last_only: bool = False,
                     logit_rows=None) -> np.ndarray:
        """One step for tokens of several sequences at once (row t: slots[t] at positions[t]);
        logits (n_tokens, n_vocab) of every row, (1, n_vocab) of the last, or those of the
        rows logit_rows lists."""
        x = self.forward_layers(self.embed(tokens), positions, 0, self.cfg.n_layer, slots)
        return self.logits(select_logit_rows(x, last_only, logit_rows))
