"""Model hyper-parameters from GGUF metadata, in one place."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS; a larger block_count is a corrupt file

ROPE_NORM = 0  # rotate adjacent pairs (x[2i], x[2i+1]): llama (GGUF permutes q/k for this)
ROPE_NEOX = 1  # rotate halves (x[i], x[i + n_rot/2]): qwen2, gemma


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key/value length per head
    n_vocab: int
    n_ctx_train: int
    norm_eps: float
    rope_type: int
    n_rot: int
    rope_base: float
    rope_freq_scale: float
    rope_base_swa: float  # local (sliding-window) layers' rope base; gemma3
    n_swa: int  # sliding window length, 0 for none
    swa_pattern: int  # every swa_pattern-th layer is global; 0 = all layers use n_swa if set
    attn_scale: float  # q scale before q.k
    attn_softcap: float  # 0 for none
    final_softcap: float  # 0 for none
    embed_scale: float  # gemma multiplies embeddings by sqrt(n_embd)
    ffn_act: str  # "silu" or "gelu"
    qk_norm: bool
    post_norms: bool
    tied_output: bool

    def is_swa(self, layer: int) -> bool:
        if self.n_swa <= 0:
            return False
        return self.swa_pattern == 0 or layer % self.swa_pattern < self.swa_pattern - 1

    def layer_rope(self, layer: int) -> tuple[float, float]:
        """(base, freq_scale) used by this layer."""
        if self.is_swa(layer):
            return self.rope_base_swa, 1.0
        return self.rope_base, self.rope_freq_scale

    @classmethod
    def from_gguf(cls, model) -> ModelConfig:
        arch = model.architecture
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"architecture '{arch}' is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        key = lambda name: f"{arch}.{name}"  # noqa: E731

        def need(name, kind=int):
            value = model.require(key(name), (int, float) if kind is float else int)
            return kind(value)

        n_layer = need("block_count")
        if not 1 <= n_layer <= MAX_LAYERS:
            raise UnsupportedModelError(f"{arch}.block_count = {n_layer} is outside 1..{MAX_LAYERS}")
        n_embd = need("embedding_length")
        n_head = need("attention.head_count")
        n_head_kv = int(model.get(key("attention.head_count_kv"), n_head))
        head_dim = int(model.get(key("attention.key_length"), n_embd // n_head))
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
            raise UnsupportedModelError(
                f"{arch}: head_count {n_head} must be a positive multiple of head_count_kv {n_head_kv}"
            )
        value_len = int(model.get(key("attention.value_length"), head_dim))
        if value_len != head_dim:
            raise UnsupportedModelError(f"{arch}: key_length {head_dim} != value_length {value_len}")
        vocab = model.get("tokenizer.ggml.tokens")
        n_vocab = int(model.get(key("vocab_size"), len(vocab) if vocab is not None else 0))
        if n_vocab <= 0:
            n_vocab = model.tensors["token_embd.weight"].n_rows
        rope_scale = 1.0
        if model.get(key("rope.scaling.type"), "none") == "linear":
            rope_scale = 1.0 / float(model.get(key("rope.scaling.factor"), 1.0))
        gemma = arch == "gemma3"
        n_swa = int(model.get(key("attention.sliding_window"), 0)) if gemma else 0
        return cls(
            arch=arch,
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=need("feed_forward_length"),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_vocab=n_vocab,
            n_ctx_train=int(model.get(key("context_length"), 4096)),
            norm_eps=need("attention.layer_norm_rms_epsilon", float),
            rope_type=ROPE_NORM if arch == "llama" else ROPE_NEOX,
            n_rot=int(model.get(key("rope.dimension_count"), head_dim)),
            rope_base=float(model.get(key("rope.freq_base"), 10000.0)),
            rope_freq_scale=rope_scale,
            rope_base_swa=10000.0 if gemma else float(model.get(key("rope.freq_base"), 10000.0)),
            n_swa=n_swa,
            swa_pattern=6 if gemma and n_swa > 0 else 0,
            attn_scale=1.0 / float(head_dim) ** 0.5,
            attn_softcap=float(model.get(key("attn_logit_softcapping"), 0.0)),
            final_softcap=float(model.get(key("final_logit_softcapping"), 0.0)),
            embed_scale=float(n_embd) ** 0.5 if gemma else 1.0,
            ffn_act="gelu" if gemma else "silu",
            qk_norm=gemma,
            post_norms=gemma,
            tied_output="output.weight" not in model.tensors,
        )
