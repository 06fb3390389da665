"""The model half of a profile, from GGUF metadata alone (no weight is read).

planner.model_profile holds the counting rules the planner uses (bytes and FLOPs per average
layer per quant type, KV bytes, input/output groups; attention is NOT multiplied by n_head_kv
as prima.cpp does). This module adds what profile-tool needs on top of it:

- the tensor data size of the file, so a test can check that nothing was dropped or doubled;
- bytes per layer per tensor role (attn_q, ffn_down, ...), for people reading the table;
- the matvec tensors of each quant type in decode order (layers, then the output matrix),
  which compute.py times with the real kernels;
- for a tied output (gemma3, SmolLM2), the embedding counted once, as the output layer, and the
  bytes one token's row lookup reads.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from planner.model_profile import profile_from_gguf
from planner.profiles import ModelProfile, ProfileError

_LAYER = re.compile(r"^blk\.(\d+)\.(.+?)(\.weight|\.bias)?$")


@dataclass(frozen=True)
class MatvecTensor:
    name: str
    qtype: str
    n_rows: int
    n_cols: int
    n_bytes: int


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    profile: ModelProfile  # what prima-plan reads (planner.profiles.ModelProfile)
    tensor_data_bytes: int  # sum of every tensor's bytes in the file
    file_bytes: int
    tied_output: bool  # no output.weight: the token embedding doubles as the output matrix
    input_row_bytes: int  # bytes one token's embedding lookup reads
    layer_bytes_by_role: dict[str, dict[str, float]]  # role -> qtype -> bytes, average layer
    matvec_tensors: dict[str, list[MatvecTensor]]  # qtype -> tensors in decode order

    @property
    def label(self) -> str:
        return self.path.name

    @property
    def n_layers(self) -> int:
        return self.profile.n_layers


def load_model_info(path: str | os.PathLike, *, with_sha256: bool = False) -> ModelInfo:
    """Raises ProfileError naming the file on anything unreadable."""
    from prima_ref.gguf_file import GGUFFormatError, GGUFModel

    path = Path(path)
    profile = profile_from_gguf(path, with_sha256=with_sha256)
    try:
        with GGUFModel.open(path) as gguf_model:
            tensors = list(gguf_model.tensors.values())
            file_bytes = gguf_model.file_size
    except (GGUFFormatError, OSError) as e:
        raise ProfileError(f"{path}: cannot read model: {e}") from None
    by_name = {t.name: t for t in tensors}
    tied = "output.weight" not in by_name
    embd = by_name.get("token_embd.weight")
    return ModelInfo(
        path=path, profile=profile, tensor_data_bytes=sum(t.n_bytes for t in tensors),
        file_bytes=file_bytes, tied_output=tied,
        input_row_bytes=embd.n_bytes // embd.n_rows if embd is not None else 0,
        layer_bytes_by_role=_bytes_by_role(tensors, profile.n_layers),
        matvec_tensors=_matvec_tensors(tensors, tied))


def _bytes_by_role(tensors, n_layers: int) -> dict[str, dict[str, float]]:
    roles: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for t in tensors:
        match = _LAYER.match(t.name)
        if match:
            role = match.group(2) + (".bias" if match.group(3) == ".bias" else "")
            roles[role][t.qtype.name] += t.n_bytes / n_layers
    return {role: dict(by_type) for role, by_type in sorted(roles.items())}


def _matvec_tensors(tensors, tied: bool) -> dict[str, list[MatvecTensor]]:
    """Weight matrices a decoded token multiplies by, per quant type, in the order decode does."""
    def layer_key(t):
        match = _LAYER.match(t.name)
        return int(match.group(1)) if match else 1 << 30

    out_name = "token_embd.weight" if tied else "output.weight"
    chosen = [t for t in tensors
              if len(t.shape) == 2 and (_LAYER.match(t.name) or t.name == out_name)]
    by_type: dict[str, list[MatvecTensor]] = defaultdict(list)
    for t in sorted(chosen, key=layer_key):
        by_type[t.qtype.name].append(MatvecTensor(t.name, t.qtype.name, t.n_rows, t.n_cols,
                                                  t.n_bytes))
    return dict(by_type)


def ms_per_layer(bytes_by_type: dict[str, float], gbps_by_type: dict[str, float]) -> float:
    """Time to stream one average layer's weights at the measured matvec speed of each type.

    Types without a measured speed (1-D F32 norms have no matvec) are charged at the slowest
    measured speed; they are a fraction of a percent of a layer.
    """
    slowest = min(gbps_by_type.values())
    return sum(b / (gbps_by_type.get(q, slowest) * 1e9) * 1e3 for q, b in bytes_by_type.items())


def model_summary(info: ModelInfo) -> dict:
    """The model's figures for the JSON 'extra' and the table; units in every key."""
    p = info.profile
    return {
        "file": info.path.name, "name": p.name, "arch": p.arch, "n_layers": p.n_layers,
        "n_vocab": p.n_vocab, "n_embd": p.n_embd, "n_ff": p.n_ff, "n_head": p.n_head,
        "n_head_kv": p.n_head_kv, "n_embd_head": p.head_dim,
        "file_bytes": info.file_bytes, "tensor_data_bytes": info.tensor_data_bytes,
        "total_bytes": p.total_bytes, "tied_output": info.tied_output,
        "layer_bytes_by_type": p.layer.bytes_by_type,
        "layer_flops_by_type": p.layer.flops_by_type,
        "layer_bytes_by_role": info.layer_bytes_by_role,
        "kv_bytes_per_token_per_layer": p.kv_bytes_per_token_per_layer,
        "attn_flops_per_token_per_ctx_per_layer": p.attn_flops_per_token_per_ctx_per_layer,
        "input_bytes_by_type": p.input.bytes_by_type,
        "input_row_bytes_per_token": info.input_row_bytes,
        "output_bytes_by_type": p.output.bytes_by_type,
        "output_flops_by_type": p.output.flops_by_type,
    }
