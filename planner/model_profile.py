"""Model profile: bytes and decode FLOPs per layer, from a GGUF's metadata (no weight reads).

Counting rules (one decoded token):
    matvec with an (n_out, n_in) weight   2 * n_out * n_in FLOPs, charged to the weight's type
    1-D tensors (norms, biases)           bytes only; their work is negligible
    attention at context c                2 * 2 * n_head * head_dim * c (QK and AV), per layer;
                                          NOT times n_head_kv (prima.cpp's over-count)
    KV cache                              2 (K, V) * n_head_kv * head_dim * 2 bytes (f16)
Layers are averaged, as prima.cpp does: a Q4_K_M file mixes Q6_K into some layers, and the
planner treats every layer as the mean layer. The output layer is `output.weight`, or the token
embedding when the model ties them (gemma3). profile-tool reuses this module.

Also here: synthetic Llama-shaped profiles for what-if planning without the file, and the
file's SHA-256 with a sidecar cache so re-planning a 40 GB model is instant.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from planner.profiles import ModelProfile, ProfileError, TensorGroup

_LAYER = re.compile(r"^blk\.(\d+)\.")
KV_BYTES_PER_ELEMENT = 2  # f16 cache, llama.cpp's default


# ---------------------------------------------------------------------------------------------
# From a GGUF file


def profile_from_gguf(path: str | os.PathLike, *, with_sha256: bool = True) -> ModelProfile:
    """Read shapes and types only; raises ProfileError naming the file and key on bad input."""
    from prima_ref.gguf_file import GGUFFormatError, GGUFModel

    path = Path(path)
    try:
        with GGUFModel.open(path) as gguf_model:
            hparams = _hparams(gguf_model, path)
            tensors = [(t.name, t.qtype.name, t.shape, t.n_bytes)
                       for t in gguf_model.tensors.values()]
    except GGUFFormatError as e:
        raise ProfileError(str(e)) from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot open model: {e}") from None
    sha = sha256_cached(path) if with_sha256 else None
    return profile_from_tensors(tensors, hparams, name=hparams.pop("name"), file=path.name,
                                sha256=sha, source=str(path))


def _hparams(gguf_model, path: Path) -> dict:
    from prima_ref.gguf_file import GGUFFormatError

    try:
        arch = gguf_model.require("general.architecture", str)

        def need(key):
            return int(gguf_model.require(f"{arch}.{key}"))

        n_embd, n_head = need("embedding_length"), need("attention.head_count")
        head_dim = int(gguf_model.get(f"{arch}.attention.key_length", n_embd // n_head))
        tokens = gguf_model.get("tokenizer.ggml.tokens")
        embd = gguf_model.tensors.get("token_embd.weight")
        n_vocab = len(tokens) if tokens is not None else (embd.shape[0] if embd else 0)
        return {"arch": arch, "n_layers": need("block_count"), "n_embd": n_embd,
                "n_ff": need("feed_forward_length"), "n_head": n_head,
                "n_head_kv": int(gguf_model.get(f"{arch}.attention.head_count_kv", n_head)),
                "head_dim": head_dim, "n_vocab": n_vocab,
                "name": str(gguf_model.get("general.name", path.stem))}
    except (GGUFFormatError, TypeError, ValueError) as e:
        raise ProfileError(f"{path}: cannot read model hyper-parameters: {e}") from None


def profile_from_tensors(tensors: list[tuple[str, str, tuple[int, ...], int]], hparams: dict, *,
                         name: str, file: str | None = None, sha256: str | None = None,
                         source: str = "") -> ModelProfile:
    """tensors: (name, ggml type name, numpy-order shape, n_bytes) for every tensor."""
    n_layers = hparams["n_layers"]
    layer_b, layer_f = defaultdict(int), defaultdict(int)
    groups = {"input": (defaultdict(int), defaultdict(int)),
              "output": (defaultdict(int), defaultdict(int))}
    names = {t[0] for t in tensors}
    seen_layers = set()
    for tname, qtype, shape, n_bytes in tensors:
        match = _LAYER.match(tname)
        if match:
            seen_layers.add(int(match.group(1)))
            _charge(layer_b, layer_f, qtype, shape, n_bytes)
        elif tname == "token_embd.weight" and "output.weight" not in names:
            # tied (gemma3): the output matvec reads the embedding every token; count it once,
            # as the output layer, since the row lookup reads a page of the same bytes
            _charge(*groups["output"], qtype, shape, n_bytes)
        elif tname == "token_embd.weight":
            groups["input"][0][qtype] += n_bytes
        elif tname.startswith("output"):
            _charge(*groups["output"], qtype, shape, n_bytes)
    if seen_layers != set(range(n_layers)):
        missing = sorted(set(range(n_layers)) - seen_layers)[:5]
        raise ProfileError(f"{source}: block_count is {n_layers} but tensors for layers "
                           f"{missing} are missing")
    kv = 2 * hparams["n_head_kv"] * hparams["head_dim"] * KV_BYTES_PER_ELEMENT
    return ModelProfile(
        name=name, arch=hparams["arch"], n_layers=n_layers, n_embd=hparams["n_embd"],
        n_ff=hparams["n_ff"], n_head=hparams["n_head"], n_head_kv=hparams["n_head_kv"],
        head_dim=hparams["head_dim"], n_vocab=hparams["n_vocab"],
        layer=TensorGroup({q: b / n_layers for q, b in layer_b.items()},
                          {q: f / n_layers for q, f in layer_f.items()}),
        input=TensorGroup(dict(groups["input"][0]), {}),
        output=TensorGroup(dict(groups["output"][0]), dict(groups["output"][1])),
        kv_bytes_per_token_per_layer=float(kv),
        attn_flops_per_token_per_ctx_per_layer=float(2 * 2 * hparams["n_head"]
                                                     * hparams["head_dim"]),
        file=file, sha256=sha256, source=source)


def _charge(bytes_by, flops_by, qtype: str, shape, n_bytes: int) -> None:
    bytes_by[qtype] += n_bytes
    if len(shape) >= 2:  # a weight matrix (or a stack of expert matrices): one matvec
        flops_by[qtype] += 2 * math.prod(shape)


# ---------------------------------------------------------------------------------------------
# Synthetic Llama-shaped models (what-if planning for files you do not have)


def llama_like(name: str, *, n_layers: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int,
               n_vocab: int, qtype: str = "Q4_K", output_qtype: str = "Q6_K") -> ModelProfile:
    """The tensor list a llama.cpp conversion of this shape would hold, all weights in `qtype`."""
    head_dim = n_embd // n_head
    kv_dim = n_head_kv * head_dim
    shapes = {"attn_q": (n_embd, n_embd), "attn_k": (kv_dim, n_embd),
              "attn_v": (kv_dim, n_embd), "attn_output": (n_embd, n_embd),
              "ffn_gate": (n_ff, n_embd), "ffn_up": (n_ff, n_embd), "ffn_down": (n_embd, n_ff)}
    tensors = [("token_embd.weight", qtype, (n_vocab, n_embd), _nbytes(qtype, n_vocab * n_embd)),
               ("output_norm.weight", "F32", (n_embd,), 4 * n_embd),
               ("output.weight", output_qtype, (n_vocab, n_embd),
                _nbytes(output_qtype, n_vocab * n_embd))]
    for i in range(n_layers):
        tensors += [(f"blk.{i}.{t}.weight", qtype, s, _nbytes(qtype, s[0] * s[1]))
                    for t, s in shapes.items()]
        tensors += [(f"blk.{i}.{t}.weight", "F32", (n_embd,), 4 * n_embd)
                    for t in ("attn_norm", "ffn_norm")]
    hparams = {"arch": "llama", "n_layers": n_layers, "n_embd": n_embd, "n_ff": n_ff,
               "n_head": n_head, "n_head_kv": n_head_kv, "head_dim": head_dim,
               "n_vocab": n_vocab}
    return profile_from_tensors(tensors, hparams, name=name)


def _nbytes(qtype: str, n_elements: int) -> int:
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return n_elements // block * type_size


LLAMA3_8B = dict(n_layers=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_vocab=128256)
LLAMA3_70B = dict(n_layers=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, n_vocab=128256)


# ---------------------------------------------------------------------------------------------
# SHA-256 with a sidecar cache


def _cache_file() -> Path:
    root = os.environ.get("PRIMA_REF_CACHE") or Path.home() / ".cache" / "prima-ref"
    return Path(root) / "sha256-cache.json"


def sha256_cached(path: str | os.PathLike) -> str:
    """Streamed SHA-256 of a file, cached by (absolute path, size, mtime_ns)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_path = _cache_file()
    cache = _read_cache(cache_path)
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")}
    cache[key] = digest.hexdigest()
    _write_cache(cache_path, cache)
    return cache[key]


def _read_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a missing or damaged cache only costs a re-hash


def _write_cache(path: Path, cache: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # read-only home: hashing still works, just not cached


# ---------------------------------------------------------------------------------------------
# Either input


def load_model(path: str | os.PathLike) -> ModelProfile:
    """A GGUF file (profiled from its metadata) or a model-profile JSON, told apart by magic."""
    from planner.profiles import load_model_profile

    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ProfileError(f"{path}: cannot read model: {e.strerror or e}") from None
    if magic == b"GGUF":
        return profile_from_gguf(path)
    return load_model_profile(path)
