"""prima_ref/derived.py's synthetic models: the files the llama.cpp oracles were made from.

Each tests/data/oracle/synth-*.json records its model's spec and sha256. Models whose types
gguf can quantize are rebuilt here (the tokenizer cut from any committed synthetic file gives
the same bytes as cutting SmolLM2's); the K-quant/IQ ones are committed under
tests/data/models/. `synthetic_model_path` gives a test either file.
"""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from prima_ref import fetch
from prima_ref.derived import (
    SYNTH_N_VOCAB,
    SYNTHETIC_SPECS,
    QuantizerMissingError,
    SyntheticSpec,
    cut_tokenizer,
    gguf_quantize,
    make_synthetic,
    synthetic_layout,
)
from prima_ref.gguf_file import GGUFModel
from prima_ref.model.config import ROPE_NEOX, ROPE_NORM, ModelConfig

DATA = Path(__file__).resolve().parent / "data"
ORACLES = {p.stem: json.loads(p.read_text())
           for p in sorted((DATA / "oracle").glob("synth-*.json"))}
COMMITTED = [n for n, o in ORACLES.items() if o["synthetic"]["file"]]
BUILT = [n for n, o in ORACLES.items() if not o["synthetic"]["file"]]
REPO = DATA.parent.parent


def synthetic_model_path(oracle: dict, tmp_dir: Path) -> Path:
    """The model file an oracle JSON was made from: committed, or rebuilt into tmp_dir."""
    syn = oracle["synthetic"]
    if syn["file"]:
        return REPO / syn["file"]
    tokenizer_src = REPO / ORACLES[COMMITTED[0]]["synthetic"]["file"]
    return make_synthetic(tmp_dir / oracle["model"], SyntheticSpec.from_json(syn["spec"]),
                          tokenizer_src)


def test_every_synthetic_spec_has_an_oracle_made_from_it():
    assert sorted(ORACLES) == sorted(SYNTHETIC_SPECS)
    for name, oracle in ORACLES.items():
        spec = SyntheticSpec.from_json(oracle["synthetic"]["spec"])
        assert spec == SYNTHETIC_SPECS[name], f"{name}: spec changed, re-run scripts/make_oracle.py"
        assert bool(oracle["synthetic"]["file"]) == spec.needs_llama_cpp()


@pytest.mark.parametrize("name", BUILT)
def test_rebuilt_synthetic_model_is_byte_identical_to_the_oracles(name, tmp_path):
    path = synthetic_model_path(ORACLES[name], tmp_path)
    assert fetch.sha256_file(path) == ORACLES[name]["sha256"]


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_synthetic_model_is_the_oracles_and_has_the_intended_types(name):
    oracle, spec = ORACLES[name], SYNTHETIC_SPECS[name]
    path = REPO / oracle["synthetic"]["file"]
    assert path.stat().st_size < 3 * 2**20
    assert fetch.sha256_file(path) == oracle["sha256"]
    model = GGUFModel.open(path)
    layout = synthetic_layout(spec)
    assert list(model.tensors) == [t[0] for t in layout]
    for tname, shape, _, _, type_name in layout:
        info = model.tensor_info(tname)
        assert info.qtype.name == type_name, tname
        assert tuple(info.shape) == shape, tname


@pytest.mark.parametrize("name", sorted(SYNTHETIC_SPECS))
def test_synthetic_model_config_and_tokenizer(name, tmp_path):
    spec = SYNTHETIC_SPECS[name]
    model = GGUFModel.open(synthetic_model_path(ORACLES[name], tmp_path))
    cfg = ModelConfig.from_gguf(model)
    assert (cfg.arch, cfg.n_layer, cfg.n_embd, cfg.n_ff) == (spec.arch, spec.n_layer,
                                                             spec.n_embd, spec.n_ff)
    assert (cfg.n_head, cfg.n_head_kv, cfg.n_vocab) == (spec.n_head, spec.n_head_kv, spec.n_vocab)
    assert cfg.rope_type == (ROPE_NEOX if spec.arch == "qwen2" else ROPE_NORM)
    assert cfg.rope_base == spec.rope_base and cfg.tied_output == (spec.output_type is None)
    has_bias = "blk.0.attn_q.bias" in model.tensors
    assert has_bias == (spec.arch == "qwen2")
    assert len(model.get("tokenizer.ggml.tokens")) == SYNTH_N_VOCAB
    assert model.get("tokenizer.ggml.pre") == spec.pre
    assert ORACLES[name]["vocab"]["n_vocab"] == SYNTH_N_VOCAB


def test_types_gguf_lacks_need_llama_cpps_quantizer(tmp_path):
    with pytest.raises(QuantizerMissingError, match="HINT"):
        gguf_quantize(np.zeros((1, 256), np.float32), gguf.GGMLQuantizationType.Q4_K)
    spec = SYNTHETIC_SPECS["synth-qwen2-kquants"]
    with pytest.raises(QuantizerMissingError):
        make_synthetic(tmp_path / "k.gguf", spec, REPO / ORACLES[COMMITTED[0]]["synthetic"]["file"])


@pytest.mark.slow
def test_cutting_smollm2s_tokenizer_gives_the_committed_files_tokenizer(smollm2_path):
    """The committed files' tokenizers are SmolLM2's first 4096 tokens and a prefix of its
    merges, so rebuilding from SmolLM2 or from a committed file gives the same bytes."""
    smol = gguf.GGUFReader(smollm2_path)
    for name in COMMITTED:
        spec = SYNTHETIC_SPECS[name]
        committed = gguf.GGUFReader(REPO / ORACLES[name]["synthetic"]["file"])
        a = cut_tokenizer(smol, spec.n_vocab, {"tokenizer.ggml.pre": spec.pre})
        b = cut_tokenizer(committed, spec.n_vocab, {"tokenizer.ggml.pre": spec.pre})
        assert a == b
        merges = dict((k, v) for k, v, *_ in a)["tokenizer.ggml.merges"]
        assert merges == smol.fields["tokenizer.ggml.merges"].contents()[:len(merges)]
