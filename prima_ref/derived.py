"""Derived GGUF models, written with the `gguf` package (llama.cpp only for types gguf lacks).

make_smollm2_q8_0: SmolLM2-135M with every Q4_1 tensor requantised to Q8_0
(quantize(dequantize(t, Q4_1), Q8_0), byte-identical to llama.cpp's own requantisation); all
other tensors and all metadata are copied, general.file_type says MOSTLY_Q8_0.

make_synthetic: a small model with seeded random weights (qwen2 with attention biases and NEOX
rope, or llama) and SmolLM2's byte-level BPE tokenizer cut to its first 4096 tokens, its
tensors in a chosen mix of quant types. SYNTHETIC_SPECS lists the ones the tests use; those
whose types `gguf` can quantize are rebuilt at test time, the others (K-quants, IQ types need
llama.cpp's quantizer) are committed under tests/data/models/.

    python -m prima_ref.derived [--dst PATH]
    python -m prima_ref.derived --synthetic NAME --dst PATH
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from prima_ref import fetch

SMOLLM2_Q8_0_NAME = "SmolLM2-135M-Instruct.Q8_0.gguf"
LLAMA_FTYPE_MOSTLY_Q8_0 = 7  # llama.h llama_ftype


def _log(msg: str) -> None:
    print(f"[synthetic] {msg}", file=sys.stderr, flush=True)


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter,
                  overrides: dict[str, object]) -> None:
    """Every key with its own GGUF type (as gguf's gguf_new_metadata does), values overridden
    where `overrides` says; GGUF.* are the reader's virtual fields, the writer adds the arch."""
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = overrides.get(field.name, field.contents())
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)


def requantize(tensor, src_type: GGMLQuantizationType, dst_type: GGMLQuantizationType):
    if tensor.tensor_type != src_type:
        return np.asarray(tensor.data), tensor.tensor_type
    floats = gguf.quants.dequantize(tensor.data, src_type)  # (rows, n_per_row) float32
    return gguf.quants.quantize(floats, dst_type), dst_type


def make_smollm2_q8_0(dst: str | os.PathLike | None = None,
                      src: str | os.PathLike | None = None) -> Path:
    """Write SmolLM2-135M-Instruct Q8_0 (by default into the model cache); returns its path."""
    src = Path(src) if src else fetch.fetch(fetch.SMOLLM2_Q4_1)
    dst = Path(dst) if dst else fetch.cache_dir() / SMOLLM2_Q8_0_NAME
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst.with_suffix(".tmp")
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    copy_metadata(reader, writer, {gguf.Keys.General.FILE_TYPE: LLAMA_FTYPE_MOSTLY_Q8_0})
    n_requantized = 0
    for tensor in reader.tensors:
        data, qtype = requantize(tensor, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)
        n_requantized += qtype != tensor.tensor_type
        writer.add_tensor(tensor.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)  # never leave a half-written file under the final name
    _log(f"wrote {dst} ({dst.stat().st_size / 2**20:.1f} MiB, {n_requantized} tensors Q4_1->Q8_0)")
    return dst


def smollm2_q8_0() -> Path:
    """The cached SmolLM2 Q8_0 file, made on first use."""
    path = fetch.cache_dir() / SMOLLM2_Q8_0_NAME
    return path if path.exists() else make_smollm2_q8_0(path)


# --- synthetic models -------------------------------------------------------------------------

SYNTH_N_VOCAB = 4096  # SmolLM2's first 4096 tokens: 17 special, 256 bytes, 3823 merged
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
GGUF_QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

Quantizer = Callable[[np.ndarray, GGMLQuantizationType], np.ndarray]


class QuantizerMissingError(ValueError):
    pass


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that decides a synthetic file's bytes (with the tokenizer source and gguf's
    writer). Layer il's j-th matrix (LAYER_MATRICES order) is layer_types[(7 il + j) % len]."""

    name: str
    arch: str  # "qwen2" (q/k/v biases, NEOX rope) or "llama"
    seed: int
    layer_types: tuple[str, ...]
    embd_type: str
    output_type: str | None  # None: tied, the head reads token_embd
    n_layer: int = 3
    n_embd: int = 256  # multiples of 256 so every K-quant and IQ type fits every row
    n_ff: int = 512
    n_head: int = 4
    n_head_kv: int = 2  # grouped-query attention
    n_vocab: int = SYNTH_N_VOCAB
    n_ctx_train: int = 4096
    rope_base: float = 1000000.0
    rms_eps: float = 1e-6
    pre: str = "qwen2"  # tokenizer.ggml.pre
    embd_std: float = 1.0  # token embedding (and tied head) entries
    output_std: float = 1.0  # separate head entries: logits of std ~16, clear top-1
    output_norm_mean: float = 1.0  # output_norm weights ~ N(mean, 0.2)
    qk_gain: float = 2.0  # q/k weights at qk_gain / sqrt(n_in): peaked attention
    residual_gain: float = 1.0  # attn_output, ffn_down at residual_gain / sqrt(n_in)
    bias_std: float = 0.5

    def matrix_type(self, il: int, j: int) -> str:
        return self.layer_types[(len(LAYER_MATRICES) * il + j) % len(self.layer_types)]

    def types(self) -> set[str]:
        out = {self.embd_type} | {self.matrix_type(il, j) for il in range(self.n_layer)
                                  for j in range(len(LAYER_MATRICES))}
        return out | ({self.output_type} if self.output_type else set())

    def needs_llama_cpp(self) -> bool:
        """True when gguf cannot quantize some tensor: the file is committed, not rebuilt."""
        return not self.types() <= set(GGUF_QUANTIZABLE)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> SyntheticSpec:
        return cls(**{**d, "layer_types": tuple(d["layer_types"])})


SYNTHETIC_SPECS = {s.name: s for s in (
    # rebuilt at test time with gguf alone; separate head
    SyntheticSpec(name="synth-qwen2-f16-q8_0-q4_0", arch="qwen2", seed=1,
                  layer_types=("F16", "Q8_0", "Q4_0", "F32"), embd_type="Q8_0",
                  output_type="F16"),
    # committed: K-quants need llama.cpp's quantizer. Tied head: small embeddings, large
    # layer outputs and output norm, else every token predicts itself
    SyntheticSpec(name="synth-qwen2-kquants", arch="qwen2", seed=2,
                  layer_types=("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"), embd_type="Q4_K",
                  output_type=None, embd_std=0.2, output_norm_mean=6.0, residual_gain=3.0),
    # committed: IQ types; llama arch, NORM rope, no biases, separate head
    SyntheticSpec(name="synth-llama-iq", arch="llama", seed=3, pre="smollm",
                  layer_types=("IQ4_NL", "IQ1_S", "IQ1_M", "BF16", "Q5_1"), embd_type="Q5_1",
                  output_type="IQ4_NL", rope_base=100000.0, rms_eps=1e-5),
)}


def gguf_quantize(floats: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """(rows, n_per_row) float32 -> (rows, row_bytes) uint8 with gguf's numpy quantizers."""
    if qtype.name not in GGUF_QUANTIZABLE:
        raise QuantizerMissingError(
            f"gguf cannot quantize {qtype.name}. HINT: that synthetic model is committed under "
            "tests/data/models/; scripts/make_oracle.py rebuilds it with llama.cpp's quantizer")
    out = gguf.quants.quantize(floats, qtype)
    return np.ascontiguousarray(out).view(np.uint8).reshape(floats.shape[0], -1)


def cut_tokenizer(reader: gguf.GGUFReader, n_vocab: int,
                  overrides: dict[str, object]) -> list[tuple[str, object, GGUFValueType,
                                                              GGUFValueType | None]]:
    """The source's tokenizer.* keys with the vocabulary cut to its first n_vocab tokens and
    only the merges whose two inputs and result are kept (for SmolLM2, a prefix of its merges,
    so ranks keep their order). Cutting an already-cut vocabulary changes nothing."""
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    if reader.fields["tokenizer.ggml.model"].contents() != "gpt2" or len(tokens) < n_vocab:
        raise ValueError(f"tokenizer source needs a gpt2 vocabulary of >= {n_vocab} tokens")
    keep = set(tokens[:n_vocab])

    def kept_merge(m: str) -> bool:
        a, b = m.split(" ", 1)
        return a in keep and b in keep and a + b in keep

    out = []
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == "tokenizer.ggml.merges":
            value = [m for m in value if kept_merge(m)]
        elif vtype == GGUFValueType.ARRAY and len(value) == len(tokens):
            value = value[:n_vocab]  # tokens, token_type, scores
        elif field.name.endswith("_token_id") and value >= n_vocab:
            raise ValueError(f"{field.name} = {value} is cut off by n_vocab {n_vocab}")
        out.append((field.name, overrides.get(field.name, value), vtype, sub_type))
    return out


def _tensor_floats(spec: SyntheticSpec, index: int, shape: tuple[int, ...], std: float,
                   mean: float = 0.0) -> np.ndarray:
    """One tensor's seeded values; its own stream, so one change leaves the others alone."""
    rng = np.random.default_rng([spec.seed, index])
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
            + np.float32(mean))


def synthetic_layout(spec: SyntheticSpec) -> list[tuple[str, tuple[int, ...], float, float, str]]:
    """(name, shape (n_rows, n_per_row) or (n,), std, mean, type name) of every tensor, in
    file order. Matrices are N(0, gain / sqrt(n_in)), norms N(1, 0.2), biases N(0, bias_std)."""
    e, f, hd = spec.n_embd, spec.n_ff, spec.n_embd // spec.n_head
    q_dim, kv_dim = spec.n_head * hd, spec.n_head_kv * hd
    out_shape = {"attn_q": (q_dim, e), "attn_k": (kv_dim, e), "attn_v": (kv_dim, e),
                 "attn_output": (e, q_dim), "ffn_gate": (f, e), "ffn_up": (f, e),
                 "ffn_down": (e, f)}
    gain = {"attn_q": spec.qk_gain, "attn_k": spec.qk_gain, "attn_output": spec.residual_gain,
            "ffn_down": spec.residual_gain}
    out = [("token_embd.weight", (spec.n_vocab, e), spec.embd_std, 0.0, spec.embd_type),
           ("output_norm.weight", (e,), 0.2, spec.output_norm_mean, "F32")]
    if spec.output_type:
        out.append(("output.weight", (spec.n_vocab, e), spec.output_std, 0.0, spec.output_type))
    for il in range(spec.n_layer):
        p = f"blk.{il}."
        out.append((p + "attn_norm.weight", (e,), 0.2, 1.0, "F32"))
        for j, m in enumerate(LAYER_MATRICES):
            shape = out_shape[m]
            std = gain.get(m, 1.0) / float(np.sqrt(shape[1]))
            out.append((p + m + ".weight", shape, std, 0.0, spec.matrix_type(il, j)))
            if spec.arch == "qwen2" and m in ("attn_q", "attn_k", "attn_v"):
                out.append((p + m + ".bias", (shape[0],), spec.bias_std, 0.0, "F32"))
        out.append((p + "ffn_norm.weight", (e,), 0.2, 1.0, "F32"))
    return out


def make_synthetic(path: str | os.PathLike, spec: SyntheticSpec,
                   tokenizer_src: str | os.PathLike | None = None,
                   quantize: Quantizer = gguf_quantize) -> Path:
    """Write `spec`'s model to `path`; the tokenizer comes from SmolLM2 (fetched by default)
    or from any GGUF holding a cut of it (e.g. another synthetic model): same bytes."""
    if spec.arch not in ("qwen2", "llama"):
        raise ValueError(f"synthetic arch must be qwen2 or llama, not {spec.arch!r}")
    path = Path(path)
    reader = gguf.GGUFReader(tokenizer_src or fetch.fetch(fetch.SMOLLM2_Q4_1))
    tokenizer = cut_tokenizer(reader, spec.n_vocab, {"tokenizer.ggml.pre": spec.pre})
    tmp = path.with_suffix(".tmp")
    writer = gguf.GGUFWriter(tmp, arch=spec.arch)
    writer.add_name(spec.name)
    writer.add_vocab_size(spec.n_vocab)
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_block_count(spec.n_layer)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_freq_base(spec.rope_base)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    for key, value, vtype, sub_type in tokenizer:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for index, (name, shape, std, mean, type_name) in enumerate(synthetic_layout(spec)):
        floats = _tensor_floats(spec, index, shape, std, mean)
        qtype = GGMLQuantizationType[type_name]
        rows = floats.reshape(-1, floats.shape[-1])
        data = floats if type_name == "F32" else quantize(rows, qtype).reshape(
            *floats.shape[:-1], -1)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    _log(f"wrote {path} ({spec.name}, {path.stat().st_size / 2**20:.2f} MiB)")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dst", help="output path (default: the prima-ref model cache)")
    parser.add_argument("--src", help="SmolLM2 Q4_1 GGUF (default: fetched into the cache)")
    parser.add_argument("--synthetic", choices=sorted(SYNTHETIC_SPECS),
                        help="write this synthetic model to --dst instead")
    args = parser.parse_args(argv)
    if args.synthetic:
        if not args.dst:
            parser.error("--synthetic needs --dst")
        make_synthetic(args.dst, SYNTHETIC_SPECS[args.synthetic], args.src)
    else:
        make_smollm2_q8_0(args.dst, args.src)
    return 0


if __name__ == "__main__":
    sys.exit(main())
