"""The tokenizer against llama.cpp's own answers (tests/data/oracle, by scripts/make_oracle.py)."""

import json
import random
import time
from pathlib import Path

import pytest

from prima_ref.gguf_file import GGUFModel
from prima_ref.tokenizer import (
    PRE_TOKENIZERS,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    compile_regexes,
    pre_split,
)

ORACLE = Path(__file__).parent / "data" / "oracle"
MODEL_ORACLES = {"smollm2": "smollm2-135m-q4_1.json", "gemma3": "gemma3-270m-q4_k_m.json"}


def _load_json(name: str) -> dict:
    return json.loads((ORACLE / name).read_text(encoding="utf-8"))


def _text(raw: bytes) -> str:
    """llama.cpp's bytes as the oracle stores them (invalid UTF-8 kept as surrogates)."""
    return raw.decode("utf-8", errors="surrogateescape")


def _with(get, **overrides):
    """A metadata getter with some keys replaced (key dots written as '__')."""
    keys = {k.replace("__", "."): v for k, v in overrides.items()}
    return lambda key, default=None: keys[key] if key in keys else get(key, default)


@pytest.fixture(scope="session")
def smollm2_get(smollm2_path):
    return GGUFModel.open(smollm2_path).get


@pytest.fixture(scope="session")
def gemma3_get(gemma3_path):
    return GGUFModel.open(gemma3_path).get


@pytest.fixture(scope="session")
def tokenizers(smollm2_get, gemma3_get):
    return {"smollm2": Tokenizer.from_metadata(smollm2_get),
            "gemma3": Tokenizer.from_metadata(gemma3_get)}


@pytest.fixture(scope="session")
def oracles():
    return {name: _load_json(file) for name, file in MODEL_ORACLES.items()}


@pytest.mark.parametrize("model", MODEL_ORACLES)
def test_ids_equal_llama_cpp_on_corpus(model, tokenizers, oracles):
    tok, cases = tokenizers[model], oracles[model]["tokenize"]
    wrong = [(c["text"], c["ids"], tok.encode(c["text"])) for c in cases
             if tok.encode(c["text"]) != c["ids"]]
    assert not wrong, f"{len(wrong)} of {len(cases)} texts differ, first: {wrong[0]}"


@pytest.mark.parametrize("model", MODEL_ORACLES)
def test_ids_equal_llama_cpp_without_parse_special(model, tokenizers, oracles):
    tok, cases = tokenizers[model], oracles[model]["tokenize"]
    wrong = [c["text"] for c in cases
             if tok.encode(c["text"], parse_special=False) != c["ids_no_parse_special"]]
    assert not wrong, f"{len(wrong)} texts differ, first: {wrong[0]!r}"


def test_special_tokens_are_whole_tokens_only_when_parsed(tokenizers):
    tok = tokenizers["smollm2"]
    assert tok.encode("<|im_start|>user") == [1, 4093]
    assert 1 not in tok.encode("<|im_start|>user", parse_special=False)


@pytest.mark.parametrize("model", MODEL_ORACLES)
@pytest.mark.parametrize("special", [False, True])
def test_decode_equals_llama_detokenize(model, special, tokenizers, oracles):
    tok, key = tokenizers[model], "detok_special" if special else "detok"
    wrong = [(c["ids"], c[key]) for c in oracles[model]["tokenize"]
             if _text(tok.decode_bytes(c["ids"], special=special)) != c[key]]
    assert not wrong, f"{len(wrong)} differ, first: {wrong[0]}"


@pytest.mark.parametrize("model", MODEL_ORACLES)
def test_round_trip_wherever_llama_cpp_round_trips(model, tokenizers, oracles):
    tok = tokenizers[model]
    bos = tok.tokens[tok.bos_id] if tok.add_bos else ""
    round_trips = [c["text"] for c in oracles[model]["tokenize"]
                   if c["detok_special"] == bos + c["text"]]
    assert len(round_trips) > 60  # most of the corpus: the test is not vacuous
    for text in round_trips:
        assert tok.decode(tok.encode(text), special=True) == bos + text


@pytest.mark.parametrize("model", MODEL_ORACLES)
def test_token_pieces_equal_llama_cpp(model, tokenizers, oracles):
    tok = tokenizers[model]
    for tid, (plain, special) in oracles[model]["pieces"].items():
        assert _text(tok.token_bytes(int(tid))) == plain, tid
        assert _text(tok.token_bytes(int(tid), special=True)) == special, tid


@pytest.mark.parametrize("model", MODEL_ORACLES)
def test_special_ids_and_flags_equal_llama_cpp(model, tokenizers, oracles):
    tok, facts = tokenizers[model], oracles[model]["vocab"]
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.eot_id) == (
        facts["n_vocab"], facts["bos"], facts["eos"], facts["eot"])
    assert (tok.add_bos, tok.add_eos) == (facts["add_bos"], facts["add_eos"])
    assert sorted(tok.eog_ids) == facts["eog_ids"]


def _variant_cases():
    data = _load_json("pretokenizers.json")
    return [pytest.param(name, v, data["texts"], id=name) for name, v in data["variants"].items()]


@pytest.mark.parametrize("name,variant,texts", _variant_cases())
def test_pre_tokenizer_ids_equal_llama_cpp(name, variant, texts, smollm2_get, gemma3_get):
    """Each pre-tokenizer on a real vocabulary: llama.cpp tokenized (and detokenized, which
    checks clean_spaces) the same file with only tokenizer.ggml.pre or add_space_prefix
    changed."""
    base = {"smollm2": smollm2_get, "gemma3": gemma3_get}[name.split(":")[0]]
    overrides = variant["overrides"]
    tok = Tokenizer.from_metadata(lambda k, d=None: overrides.get(k, base(k, d)))
    cases = zip(texts, variant["ids"], variant["ids_no_parse_special"], variant["detok"],
                strict=True)
    for text, ids, ids_plain, detok in cases:  # None: same as ids / as the text
        assert tok.encode(text) == ids, (name, text)
        assert tok.encode(text, parse_special=False) == (ids if ids_plain is None else ids_plain)
        assert _text(tok.decode_bytes(ids)) == (text if detok is None else detok), (name, text)


@pytest.mark.parametrize("model,char", [("smollm2", "😀"), ("gemma3", "\U0002ebf0")])
def test_stream_decoder_holds_back_a_character_split_across_tokens(model, char, tokenizers):
    tok = tokenizers[model]
    ids = tok.encode(char, add_special=False)
    assert len(ids) > 1, "the character must span several tokens for this test to mean anything"
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in ids] == [""] * (len(ids) - 1) + [char]
    assert stream.flush() == ""


@pytest.mark.parametrize("model", MODEL_ORACLES)
def test_stream_decoder_output_joins_to_decode(model, tokenizers, oracles):
    tok = tokenizers[model]
    for case in oracles[model]["tokenize"]:
        stream = StreamDecoder(tok)
        streamed = "".join(stream.push(i) for i in case["ids"]) + stream.flush()
        assert streamed == tok.decode(case["ids"]), case["text"]


def test_stream_decoder_flush_marks_an_unfinished_character(tokenizers):
    tok = tokenizers["smollm2"]
    stream = StreamDecoder(tok)
    first = tok.encode("😀", add_special=False)[0]
    assert stream.push(first) == ""
    assert stream.flush() == "\ufffd"


@pytest.mark.parametrize("model", MODEL_ORACLES)
def test_encoding_4kb_of_fresh_text_takes_well_under_a_second(model, tokenizers):
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyzäöüßéñ日本語中文한국어0123456789"
    words = ("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
             for _ in range(10**6))
    text = ""
    while len(text) < 4096:
        text += next(words) + rng.choice([" ", " ", ", ", ".\n", "  "])
    start = time.perf_counter()
    tokenizers[model].encode(text)
    assert time.perf_counter() - start < 0.5


def test_unknown_pre_tokenizer_is_named_in_the_error(smollm2_get):
    with pytest.raises(TokenizerError, match=r"no-such-pre.*tokenizer\.ggml\.pre"):
        Tokenizer.from_metadata(_with(smollm2_get, tokenizer__ggml__pre="no-such-pre"))


def test_unknown_tokenizer_model_is_named_in_the_error(smollm2_get):
    with pytest.raises(TokenizerError, match=r"'t5'.*tokenizer\.ggml\.model"):
        Tokenizer.from_metadata(_with(smollm2_get, tokenizer__ggml__model="t5"))


def test_missing_vocabulary_is_an_error(smollm2_get):
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_metadata(_with(smollm2_get, tokenizer__ggml__tokens=None))


def test_short_token_type_array_is_an_error(smollm2_get):
    with pytest.raises(TokenizerError, match="token_type has 10 entries for 49152 tokens"):
        Tokenizer.from_metadata(_with(smollm2_get, tokenizer__ggml__token_type=[1] * 10))


def test_missing_merges_is_an_error_for_bpe(smollm2_get):
    with pytest.raises(TokenizerError, match="tokenizer.ggml.merges"):
        Tokenizer.from_metadata(_with(smollm2_get, tokenizer__ggml__merges=None))


def test_token_id_outside_the_vocabulary_is_an_error(tokenizers):
    with pytest.raises(TokenizerError, match="49152 is outside"):
        tokenizers["smollm2"].decode([49152])


def test_pre_split_classifies_code_points_with_llama_cpps_table():
    """U+0558 became a letter in Unicode 16; llama.cpp's table predates it, so a GPT-2-style
    split cuts there (Python's own tables would keep 'a\u0558b' one piece)."""
    smollm = compile_regexes(PRE_TOKENIZERS["smollm"].regexes)
    assert pre_split("a\u0558b", smollm) == ["a", "\u0558", "b"]
    assert pre_split("x 12 \u0663", smollm) == ["x", " ", "1", "2", " ", "\u0663"]


def test_repeated_token_text_is_an_error(smollm2_get):
    tokens = list(smollm2_get("tokenizer.ggml.tokens"))
    tokens[100] = tokens[7]
    with pytest.raises(TokenizerError, match="at ids 7 and 100"):
        Tokenizer.from_metadata(_with(smollm2_get, tokenizer__ggml__tokens=tokens))
