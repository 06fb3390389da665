"""Write llama.cpp's answers for our real models into tests/data/oracle/*.json.

Dev-only: needs llama-cpp-python 0.3.36 built as /work/shared/MODELS.md says (AMX off); the
tests only read the JSON. One file per model with
  - vocab: BOS/EOS/EOT ids, add_bos/add_eos, every end-of-generation id;
  - tokenize: a varied corpus plus seeded random strings -> ids (add_special as the model
    says, with and without parse_special) and llama_detokenize's text for those ids;
  - pieces: llama_token_to_piece of the special and user-defined tokens;
  - chat: llama_chat_apply_template's built-in (non-Jinja) rendering of a conversation;
  - generation: 3 prompts, a 32-token greedy continuation and the top-5 logits at every
    position, with the settings used.
and pretokenizers.json: the same corpus tokenized after changing one tokenizer key of a real
vocabulary (tokenizer.ggml.pre for SmolLM2's BPE vocabulary, add_space_prefix for Gemma's), so
every pre-tokenizer is checked against llama.cpp with real merges.

and <name>.json for each synthetic model of prima_ref.derived.SYNTHETIC_SPECS (random weights,
SmolLM2's tokenizer cut to 4096 tokens), with a "synthetic" key saying how to get its file:
those with K-quant/IQ tensors are (re)written to tests/data/models/<name>.gguf with llama.cpp's
quantizer and committed; the others are rebuilt at test time by make_synthetic (gguf alone)
and must match the recorded sha256.

    python scripts/make_synthetic.py      # SmolLM2 Q8_0, needed for its oracle
    python scripts/make_oracle.py [--out tests/data/oracle] [--models all|real|synthetic]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from prima_ref import chat, fetch  # noqa: E402
from prima_ref.derived import (  # noqa: E402
    GGUF_QUANTIZABLE,
    SMOLLM2_Q8_0_NAME,
    SYNTHETIC_SPECS,
    SyntheticSpec,
    copy_metadata,
    gguf_quantize,
    make_synthetic,
)
from prima_ref.gguf_file import GGUFModel  # noqa: E402

N_CTX = 256  # longest sequence here is ~100 tokens
N_THREADS = 2  # this machine's cores
N_CONTINUATION = 32
TOP_K = 5
FUZZ_SEED, N_FUZZ = 20261122, 48
GGML_TYPE_F32 = 0  # KV cache in f32: one source of difference fewer than llama.cpp's f16

CORPUS = [
    "",
    "Hello world",
    " Hello world",
    "  two leading spaces",
    "   trailing spaces   ",
    "a",
    " ",
    "\n",
    "\t",
    "   ",
    "\n\n\n",
    "Hello\nworld\n\nnew paragraph\r\nwindows line\rold mac",
    "a    b\t\tc \n \n  d\n\t\n   e",
    "3.14159 1234567890 1,000,000 -42 0x1F 2024-11-22 007",
    'def fib(n):\n    """Fibonacci."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n',
    'int main(void) { printf("%d\\n", a[i]++); return 0; }\n',
    "I'm sure you'll see they've done it, isn't it? DON'T SHOUT'S 'quoted' it's",
    "Hello , world . Really ? Yes ! it ' s he 's I 'm we 're they 've you 'll I 'd don 't ' x",
    "naïve café résumé Ünïcödé straße ÆØÅ œ",
    "Ελληνικά και русский язык",
    "日本語のテキストと中文文本，한국어 텍스트。",
    "I ❤️ emoji 😀👍🏽🇺🇸 family: 👨‍👩‍👧‍👦",
    "e\u0301 n\u0303 Z\u0351\u0322a\u0338lgo",
    "non\u00a0breaking\u3000ideographic\u2009thin\u2028line\u0085nel",
    "مرحبا بالعالم שלום עולם नमस्ते दुनिया",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text</s> and <eos> <|endoftext|> <unk> <pad>",
    "<table><tr><td>cell</td></tr></table> <b>bold</b> <unused12>",
    "<|im_start <|im_end| <<|im_start|>> <|im_start|><|im_start|>",
    "# Title\n\n* item one\n* item two\n\n```python\nprint('hi')\n```\n",
    "https://example.com/path?q=1&r=2#frag user@example.org",
    "∑_{i=1}^{n} x_i² ≤ ∞ ± √2 ≈ 1.414",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa !!!!!!!!!!????",
    "٣٤٥ ४५६ ⅫⅣ ①② ½",
    "tab\there\x00nul\x07bell\x1b[31mred\x1b[0m",
    "ÿþ\u0100\u0101 \u2581\u2581 spm space char",
    "Hello world" * 3,
    "The quick brown fox jumps over the lazy dog. " * 4,
    "    indented\n        more\n\t\ttabs\n" + " " * 40 + "x" + "\n" * 35 + "y",
]

# Pools for random strings: each a kind of code point the pre-tokenizers treat differently,
# plus code points whose category changed in newer Unicode (llama.cpp's table is older).
_POOLS = [
    "abcXYZ", "0123456789", " ", "  \t\n\r", "\u00a0\u3000\u2028\x0b\x0c\x85\u2009",
    ".,;:!?'\"-()[]{}<>/\\|@#$%^&*_+=~`", "'s't're've'm'll'd'S'T'RE", "éüñßøåÆ",
    "αβγΩжЖщ", "中文字日本語", "한국어", "ひらがなカタカナ", "\u0301\u0303\u0351\u0322",
    "٣٤٥४५६ⅫⅣ①½", "€£¥©®™°±×÷", "😀👍🏽🇺🇸❤️\u200d", "\u0558\u058b\u088f\u1c89\u208f",
    "\U00010d40\U00010d41\u1b4e\u20c1\u05c8\U00031350\U0002ebf0", "<|im_start|><eos>\n\n",
]


def fuzz_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(rng.choice(_POOLS)) for _ in range(rng.randint(1, 24)))
            for _ in range(n)]


GENERATION_PROMPTS = {
    "llama": [
        ("chat", [{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": "What is the capital of France?"}]),
        ("text", "The three primary colors are"),
        ("code", "def is_prime(n):\n    "),
    ],
    "gemma3": [
        ("chat", [{"role": "user", "content": "What is the capital of France?"}]),
        ("text", "The three primary colors are"),
        ("code", "def is_prime(n):\n    "),
    ],
}

CHAT_CASES = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there "},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": " 2+2? "}],
    [{"role": "user", "content": "Translate 'chat' to French."}],
]

# Which tokenizer key to change on which vocabulary, and how.
PRE_VARIANTS = {
    "smollm2": {f"pre={p}": {"tokenizer.ggml.pre": p} for p in (
        "smollm", "llama-bpe", "qwen2", "deepseek-r1-qwen", "default", "gpt-2", "starcoder",
        "falcon", "deepseek-coder", "deepseek-llm")},
    "gemma3": {"add_space_prefix=true": {"tokenizer.ggml.add_space_prefix": True}},
}


def _log(msg: str) -> None:
    print(f"[oracle] {msg}", file=sys.stderr, flush=True)


# --- llama.cpp helpers ------------------------------------------------------------------------


def load(path: Path, vocab_only: bool = False) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=str(path), vocab_only=vocab_only, n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX,
        n_threads=N_THREADS, n_threads_batch=N_THREADS, type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32, flash_attn=False, verbose=False)


def detokenize(vocab, ids: list[int], special: bool) -> str:
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, False, special)
    if n < 0:
        raise RuntimeError(f"llama_detokenize needs {-n} bytes")
    return buf.raw[:n].decode("utf-8", errors="surrogateescape")


def piece(vocab, tid: int, special: bool) -> str:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, tid, buf, 256, 0, special)
    return buf.raw[:n].decode("utf-8", errors="surrogateescape")


def tokenize_cases(llm: llama_cpp.Llama, texts: list[str], with_detok: bool) -> list[dict]:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    cases = []
    for text in texts:
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        case = {"text": text, "ids": ids,
                "ids_no_parse_special": llm.tokenize(text.encode(), add_bos=True, special=False)}
        if with_detok:
            case["detok"] = detokenize(vocab, ids, special=False)
            case["detok_special"] = detokenize(vocab, ids, special=True)
        cases.append(case)
    return cases


def vocab_facts(llm: llama_cpp.Llama) -> dict:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n = llama_cpp.llama_vocab_n_tokens(vocab)

    def tid(value: int) -> int | None:
        return None if value < 0 else value

    return {
        "n_vocab": n,
        "bos": tid(llama_cpp.llama_vocab_bos(vocab)),
        "eos": tid(llama_cpp.llama_vocab_eos(vocab)),
        "eot": tid(llama_cpp.llama_vocab_eot(vocab)),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "eog_ids": [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)],
    }


def special_pieces(llm: llama_cpp.Llama, get) -> dict:
    """token_to_piece of every non-normal token except gemma's ~6k <unusedN> placeholders."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
    ids = [i for i, t in enumerate(types) if t != 1 and "unused" not in tokens[i]]
    return {str(i): [piece(vocab, i, False), piece(vocab, i, True)] for i in ids}


def legacy_chat(template: str, messages: list[dict]) -> str:
    """llama.cpp's built-in renderer for the format it detects in `template`."""
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
    arr = (llama_cpp.llama_chat_message * len(keep))(
        *[llama_cpp.llama_chat_message(role=r, content=c) for r, c in keep])
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(template.encode(), arr, len(keep), True, buf, 1 << 16)
    if n < 0:
        raise RuntimeError("llama_chat_apply_template does not know this template")
    return buf.raw[:n].decode()


def _clear(llm: llama_cpp.Llama) -> None:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)


def _decode(llm: llama_cpp.Llama, ids: list[int], n_past: int, all_logits: bool) -> None:
    llm._batch.set_batch(batch=ids, n_past=n_past, logits_all=all_logits)
    llm._ctx.decode(llm._batch)


def _logits(llm: llama_cpp.Llama, i: int) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, i)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def _top(logits: np.ndarray) -> list[list]:
    idx = np.argsort(-logits, kind="stable")[:TOP_K]
    return [[int(i), round(float(logits[i]), 4)] for i in idx]


def generation_case(llm: llama_cpp.Llama, prompt_ids: list[int]) -> dict:
    """Greedy continuation (prompt in one batch, then one token per decode), then the whole
    sequence again in one batch with logits at every position."""
    _clear(llm)
    _decode(llm, prompt_ids, 0, all_logits=False)
    out, decode_top = [], []
    logits = _logits(llm, -1)
    for step in range(N_CONTINUATION):
        tid = int(np.argmax(logits))
        out.append(tid)
        _decode(llm, [tid], len(prompt_ids) + step, all_logits=False)
        logits = _logits(llm, -1)
        decode_top.append(_top(logits))
    seq = prompt_ids + out
    _clear(llm)
    _decode(llm, seq, 0, all_logits=True)
    batched_top = [_top(_logits(llm, i)) for i in range(len(seq))]
    return {"prompt_ids": prompt_ids, "greedy_ids": out,
            "top5_batched": batched_top, "top5_decode_after_greedy": decode_top[:-1]}


# --- llama.cpp's quantizer (types gguf lacks) --------------------------------------------------


def _ggml_base() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    return lib


def llama_quantize(floats: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """(rows, n_per_row) float32 -> (rows, row_bytes) uint8 as llama-quantize writes them
    without an imatrix; the types that need one (IQ1_S, IQ1_M) get an all-ones matrix."""
    if qtype.name in GGUF_QUANTIZABLE:
        return gguf_quantize(floats, qtype)
    lib = _ggml_base()
    src = np.ascontiguousarray(floats, dtype=np.float32)
    n_rows, n_per_row = src.shape
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block}, not {n_per_row}")
    dst = np.zeros((n_rows, n_per_row // block * type_size), dtype=np.uint8)
    imatrix = None
    if lib.ggml_quantize_requires_imatrix(int(qtype)):
        imatrix = np.ones(n_per_row, dtype=np.float32)
    lib.ggml_quantize_init(int(qtype))
    n = lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0, n_rows,
                                n_per_row, None if imatrix is None else imatrix.ctypes.data)
    if n != dst.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {dst.nbytes}")
    return dst


# --- metadata-edited vocabulary files ---------------------------------------------------------


def write_vocab_variant(src_reader: gguf.GGUFReader, overrides: dict, dst: Path) -> None:
    """A GGUF with the source's metadata (keys changed as `overrides` says, new keys added)
    and no tensors: enough for llama.cpp's vocab_only load."""
    arch = src_reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch=arch)
    present = {k: v for k, v in overrides.items() if k in src_reader.fields}
    copy_metadata(src_reader, writer, present)
    for key, value in overrides.items():
        if key not in src_reader.fields:
            vtype = gguf.GGUFValueType.BOOL if isinstance(value, bool) else \
                gguf.GGUFValueType.STRING
            writer.add_key_value(key, value, vtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


# --- main -------------------------------------------------------------------------------------


def settings() -> dict:
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "n_ctx": N_CTX, "n_batch": N_CTX, "n_ubatch": N_CTX, "n_threads": N_THREADS,
        "kv_cache_type": "f32", "flash_attn": False,
        "tokenize": "llama_tokenize(add_special=True, parse_special=True); "
                    "ids_no_parse_special with parse_special=False",
        "detok": "llama_detokenize(remove_special=False, unparse_special=False); "
                 "detok_special with unparse_special=True",
        "generation": "greedy: prompt in one llama_decode, then one token per llama_decode, "
                      "argmax of llama_get_logits_ith(-1); top5_batched: prompt+continuation in "
                      "one llama_decode (one ubatch) with logits at every position; "
                      "top5_decode_after_greedy[i]: logits after decoding greedy_ids[i] "
                      "token by token",
        "generated_at": time.strftime("%Y-%m-%d"),
    }


def model_oracle(path: Path, arch_prompts: str, texts: list[str]) -> dict:
    _log(f"{path.name}: loading")
    get = GGUFModel.open(path).get
    llm = load(path)
    template = chat.template_from_metadata(get)
    result = {"model": path.name, "sha256": fetch.sha256_file(path), "settings": settings(),
              "vocab": vocab_facts(llm), "tokenize": tokenize_cases(llm, texts, True),
              "pieces": special_pieces(llm, get), "chat": [], "generation": []}
    for messages in CHAT_CASES:
        result["chat"].append({"messages": messages, "llama_cpp": legacy_chat(template, messages)})
    for name, prompt in GENERATION_PROMPTS[arch_prompts]:
        if isinstance(prompt, list):  # our Jinja rendering, then llama.cpp's tokenizer
            text = chat.render(template, prompt, bos_token="", strip_bos=False)
        else:
            text = prompt
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        _log(f"{path.name}: generating for {name!r} ({len(ids)} prompt tokens)")
        result["generation"].append({"name": name, "prompt_text": text,
                                     **generation_case(llm, ids)})
    llm.close()
    return result


def pre_variants(paths: dict[str, Path], texts: list[str]) -> dict:
    out = {"settings": settings(), "texts": texts, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for base, variants in PRE_VARIANTS.items():
            reader = gguf.GGUFReader(paths[base])
            for name, overrides in variants.items():
                dst = Path(tmp) / f"{base}-{len(out['variants'])}.gguf"
                write_vocab_variant(reader, overrides, dst)
                llm = load(dst, vocab_only=True)
                cases = tokenize_cases(llm, texts, with_detok=True)
                # null where equal to ids / to the input text, to keep the file small
                out["variants"][f"{base}:{name}"] = {
                    "model": paths[base].name, "overrides": overrides,
                    "ids": [c["ids"] for c in cases],
                    "ids_no_parse_special": [None if c["ids_no_parse_special"] == c["ids"]
                                             else c["ids_no_parse_special"] for c in cases],
                    "detok": [None if c["detok"] == c["text"] else c["detok"] for c in cases]}
                llm.close()
                _log(f"variant {base}:{name} done")
    return out


def synthetic_oracle(spec: SyntheticSpec, models_dir: Path, tmp: Path, texts: list[str]) -> dict:
    committed = spec.needs_llama_cpp()
    path = (models_dir if committed else tmp) / f"{spec.name}.gguf"
    src = fetch.fetch(fetch.SMOLLM2_Q4_1)
    make_synthetic(path, spec, src, quantize=llama_quantize if committed else gguf_quantize)
    result = model_oracle(path, "llama", texts)
    result["synthetic"] = {
        "spec": spec.to_json(),
        "file": (str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name)
                if committed else None,
        "rebuild": None if committed else
            "prima_ref.derived.make_synthetic(path, SyntheticSpec.from_json(spec), "
            "tokenizer_src=SmolLM2 Q4_1 or any synthetic file)",
        "tokenizer_src": src.name,
        "quantizer": "llama.cpp ggml_quantize_chunk, no imatrix (all-ones for IQ1_S/IQ1_M)"
                     if committed else "gguf.quants.quantize",
        "size_bytes": path.stat().st_size,
    }
    return result


def write_json(obj: dict, path: Path) -> None:
    # ASCII escapes: llama.cpp may return invalid UTF-8, kept as lone surrogates
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="ascii")
    _log(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "tests" / "data" / "oracle"))
    parser.add_argument("--models-dir", default=str(ROOT / "tests" / "data" / "models"),
                        help="where the committed synthetic models are written")
    parser.add_argument("--models", choices=("all", "real", "synthetic"), default="all")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = CORPUS + fuzz_texts(N_FUZZ, FUZZ_SEED)
    if args.models in ("all", "synthetic"):
        models_dir = Path(args.models_dir)
        models_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            for spec in SYNTHETIC_SPECS.values():
                write_json(synthetic_oracle(spec, models_dir, Path(tmp), texts),
                           out / f"{spec.name}.json")
    if args.models == "synthetic":
        return 0
    q8 = fetch.cache_dir() / SMOLLM2_Q8_0_NAME
    if not q8.exists():
        raise SystemExit(f"{q8} is missing. HINT: run python scripts/make_synthetic.py first")
    paths = {"smollm2": fetch.fetch(fetch.SMOLLM2_Q4_1), "smollm2_q8_0": q8,
             "gemma3": fetch.fetch(fetch.GEMMA3_270M)}
    for key, arch, fname in (("smollm2", "llama", "smollm2-135m-q4_1.json"),
                             ("smollm2_q8_0", "llama", "smollm2-135m-q8_0.json"),
                             ("gemma3", "gemma3", "gemma3-270m-q4_k_m.json")):
        write_json(model_oracle(paths[key], arch, texts), out / fname)
    write_json(pre_variants(paths, texts), out / "pretokenizers.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
