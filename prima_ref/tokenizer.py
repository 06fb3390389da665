"""Tokenizer from GGUF metadata, giving the same token ids as llama.cpp (src/llama-vocab.cpp).

Two kinds, chosen by `tokenizer.ggml.model`:

- `gpt2`: byte-level BPE. Text is split by the pre-tokenizer regexes that `tokenizer.ggml.pre`
  names, each piece's UTF-8 bytes are mapped to printable characters (GPT-2's byte-to-unicode
  table), then merged pairwise by merge rank.
- `llama`: SentencePiece-style. Spaces become U+2581, characters are merged pairwise by token
  score, and characters no token covers fall back to `<0xNN>` byte tokens.

Both first cut special tokens out of the text as whole tokens (llama.cpp's
`tokenizer_st_partition`): control tokens only when `parse_special` is on (llama-cli's prompts),
user-defined tokens always. Sections: token attributes, pre-tokenizers, the Tokenizer (load,
encode, decode), streaming decode.
"""

from __future__ import annotations

import codecs
import heapq
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from prima_ref._llama_unicode import CATEGORY_RANGES, WHITESPACE_RANGES


class TokenizerError(ValueError):
    """The GGUF tokenizer metadata is missing, malformed or of a kind we do not support."""


# ---------------------------------------------------------------------------------------------
# Token attributes (llama.h llama_token_attr) and GGUF token types (llama_token_type)
# ---------------------------------------------------------------------------------------------


class Attr:
    """Bit flags, kept as plain ints: a 262k-token vocabulary is scanned several times at load."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5


# tokenizer.ggml.token_type values: 0 undefined, 1 normal, 2 unknown, 3 control,
# 4 user-defined, 5 unused, 6 byte
_ATTR_BY_TOKEN_TYPE = (
    Attr.UNDEFINED, Attr.NORMAL, Attr.UNKNOWN, Attr.CONTROL,
    Attr.USER_DEFINED, Attr.UNUSED, Attr.BYTE,
)

# Texts llama.cpp treats as end-of-generation whatever their type (llama-vocab.cpp, "eog").
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})

# GGUF key stems (tokenizer.ggml.<stem>_token_id) per special token, later keys winning;
# "seperator" is llama.cpp's spelling.
_SPECIAL_KEYS = {
    "bos": ("bos",), "eos": ("eos",), "eot": ("eot",), "eom": ("eom",), "unk": ("unknown",),
    "sep": ("seperator",), "pad": ("padding",), "mask": ("mask",),
    "fim_pre": ("fim_pre", "prefix"), "fim_suf": ("fim_suf", "suffix"),
    "fim_mid": ("fim_mid", "middle"), "fim_pad": ("fim_pad",), "fim_rep": ("fim_rep",),
    "fim_sep": ("fim_sep",),
}
# Texts llama.cpp looks for when the file names no such token. llama.cpp takes the first it meets
# walking a hash map; we take the lowest id, which agrees with it for SmolLM2 (<|endoftext|>
# over <|im_end|>). It matters only for vocabularies holding two texts of one list.
_FOUND_BY_TEXT = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
            "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
            "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}

SPM_SPACE = "\u2581"  # SentencePiece's visible space


# ---------------------------------------------------------------------------------------------
# Pre-tokenizers (byte-level BPE only)
# ---------------------------------------------------------------------------------------------

# Regexes copied verbatim from llama.cpp's llm_tokenizer_bpe; _compile() swaps \p{..} and \s for
# llama.cpp's own Unicode tables so every code point is classified as llama.cpp does it.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")
_DEEPSEEK_CODER = (
    "[\r\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}",
)
_DEEPSEEK_LLM = (
    "[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295"
    "-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-"
    "\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-"
    "\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-"
    "\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-"
    "\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-"
    "\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e"
    "\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-"
    "\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-"
    "\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-"
    "\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
)


@dataclass(frozen=True)
class PreTokenizer:
    """One `tokenizer.ggml.pre` family: its regexes (applied in turn) and the flags it sets."""

    regexes: tuple[str, ...]
    clean_spaces: bool = True  # detokenize drops spaces before ?!., (llama.cpp's default for BPE)
    ignore_merges: bool = False  # a piece that is already a token is emitted whole
    add_bos: bool = False  # default when the file has no tokenizer.ggml.add_bos_token


_SMOLLM = (r"\p{N}", _GPT2)
_PRE_FAMILIES = {
    ("default",): PreTokenizer(_DEFAULT),
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
     "jina-v5-nano"): PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    ("dbrx", "smaug-bpe"): PreTokenizer((_LLAMA3,)),
    ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2"): PreTokenizer((_QWEN2,), clean_spaces=False),
    ("megrez", "stablelm2"): PreTokenizer((_QWEN2,)),
    ("smollm", "command-r"): PreTokenizer(_SMOLLM, clean_spaces=False),
    ("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"): PreTokenizer(_SMOLLM),
    ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
     "mellum", "modern-bert", "mpt", "olmo", "jais", "exaone4"): PreTokenizer((_GPT2,)),
    ("trillion", "granite-docling"): PreTokenizer((_GPT2,), clean_spaces=False),
    ("falcon",): PreTokenizer(_FALCON),
    ("deepseek-coder",): PreTokenizer(_DEEPSEEK_CODER, clean_spaces=False),
    ("deepseek-llm",): PreTokenizer(_DEEPSEEK_LLM, clean_spaces=False),
}
PRE_TOKENIZERS = {name: pre for names, pre in _PRE_FAMILIES.items() for name in names}


def _class_body(ranges: str) -> str:
    """'41-5a 61' -> a regex character-class body with escaped code points."""
    def esc(cp: str) -> str:
        return f"\\U{int(cp, 16):08x}"
    return "".join("-".join(esc(cp) for cp in word.split("-")) for word in ranges.split())


_CLASS_BODY = {f"\\p{{{k}}}": _class_body(v) for k, v in CATEGORY_RANGES.items()}
_CLASS_BODY["\\s"] = _class_body(WHITESPACE_RANGES)


def _compile(pattern: str) -> re.Pattern[str]:
    r"""Translate \p{X}, \s and \S into explicit classes (inside [...] or as their own class)."""
    out, i, inside = [], 0, False
    while i < len(pattern):
        if pattern[i] == "\\" and pattern.startswith("\\p{", i):
            key = pattern[i:pattern.index("}", i) + 1]
            if key not in _CLASS_BODY:
                raise TokenizerError(f"pre-tokenizer regex uses unsupported class {key}")
            body, i = _CLASS_BODY[key], i + len(key)
            out.append(body if inside else f"[{body}]")
            continue
        if pattern[i] == "\\" and pattern[i + 1] in "sS":
            body = _CLASS_BODY["\\s"]
            if inside and pattern[i + 1] == "S":
                raise TokenizerError("pre-tokenizer regex uses \\S inside a class")
            out.append(body if inside else (f"[{body}]" if pattern[i + 1] == "s" else f"[^{body}]"))
            i += 2
            continue
        if pattern[i] == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        inside = (inside or pattern[i] == "[") and pattern[i] != "]"
        # ECMAScript's $ is the very end; Python's would also match before a final newline
        out.append("\\Z" if pattern[i] == "$" and not inside else pattern[i])
        i += 1
    return re.compile("".join(out))


@lru_cache(maxsize=32)
def compile_regexes(regexes: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    """A pre-tokenizer's llama.cpp regexes, ready for pre_split."""
    return tuple(_compile(r) for r in regexes)


def pre_split(text: str, regexes: Sequence[re.Pattern[str]]) -> list[str]:
    """llama.cpp's unicode_regex_split: each regex cuts every piece further; text between
    matches stays a piece of its own."""
    pieces = [text]
    for regex in regexes:
        out = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(piece):
                if m.start() > pos:
                    out.append(piece[pos:m.start()])
                out.append(m.group())
                pos = m.end()
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible map from each byte to a printable character."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {ch: b for b, ch in enumerate(BYTE_TO_UNICODE)}


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------

MetadataGetter = Callable[[str, Any], Any]
_MISSING = object()
_WORD_CACHE_MAX = 1 << 16


class Tokenizer:
    """Encode and decode with a GGUF model's vocabulary exactly as llama.cpp does."""

    def __init__(self, get: MetadataGetter):
        self.model = _get_str(get, "tokenizer.ggml.model")
        if self.model not in ("gpt2", "llama"):
            raise TokenizerError(
                f"unknown tokenizer model {self.model!r} in tokenizer.ggml.model "
                "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")
        self.pre_name = get("tokenizer.ggml.pre", None) or "default"
        self._load_vocab(get)
        self._load_flags(get)
        self._load_special_ids(get)
        self._mark_special_attrs()
        # longest first, as llama.cpp's cache_special_tokens (ties by id: llama.cpp's order
        # among equal lengths is std::sort's and matters only for overlapping same-length texts)
        self.special_ids = sorted(
            (i for i, a in enumerate(self.attrs)
             if a & (Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN)),
            key=lambda i: (-len(self.tokens[i]), i))
        self._word_cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_metadata(cls, get: MetadataGetter) -> Tokenizer:
        """`get(key, default)` returns GGUF metadata as Python values (str, int, bool,
        list[str] for string arrays, sequences of numbers for numeric arrays)."""
        return cls(get)

    # --- loading ------------------------------------------------------------------------------

    def _load_vocab(self, get: MetadataGetter) -> None:
        tokens = get("tokenizer.ggml.tokens", None)
        if not isinstance(tokens, list | tuple) or not tokens:
            raise TokenizerError("tokenizer.ggml.tokens is missing or not a non-empty string array")
        n = len(tokens)
        if not all(isinstance(t, str) for t in tokens):
            raise TokenizerError("tokenizer.ggml.tokens holds non-string entries")
        # llama.cpp renames empty tokens so that every id keeps a distinct text
        self.tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.token_to_id = dict(zip(self.tokens, range(n), strict=True))
        if len(self.token_to_id) != n:  # llama.cpp aborts on such a file
            dup = next(i for i, t in enumerate(self.tokens) if self.token_to_id[t] != i)
            raise TokenizerError(
                f"tokenizer.ggml.tokens repeats {self.tokens[dup]!r} at ids {dup} and "
                f"{self.token_to_id[self.tokens[dup]]}; token texts must be unique")
        self.scores = _numeric_array(get, "tokenizer.ggml.scores", n, float, 0.0)
        types = _numeric_array(get, "tokenizer.ggml.token_type", n, int, 1)
        self.attrs = [_ATTR_BY_TOKEN_TYPE[t] if 0 <= t < 7 else Attr.UNDEFINED for t in types]
        self.bpe_ranks: dict[tuple[str, str], int] = {}
        if self.model == "gpt2":
            merges = get("tokenizer.ggml.merges", None)
            if not isinstance(merges, list | tuple):
                raise TokenizerError("tokenizer.ggml.merges is missing or not a string array "
                                     "(needed by a 'gpt2' tokenizer)")
            for rank, merge in enumerate(merges):
                pos = merge.find(" ", 1)  # the first space after the first character splits
                pair = (merge[:pos], merge[pos + 1:]) if pos >= 0 else ("", "")
                self.bpe_ranks.setdefault(pair, rank)

    def _load_flags(self, get: MetadataGetter) -> None:
        if self.model == "gpt2":
            pre = PRE_TOKENIZERS.get(self.pre_name)
            if pre is None:
                raise TokenizerError(
                    f"unknown pre-tokenizer {self.pre_name!r} in tokenizer.ggml.pre; supported: "
                    f"{', '.join(sorted(PRE_TOKENIZERS))}")
            self.pre = pre
            self._regexes = compile_regexes(pre.regexes)
            defaults = dict(add_space_prefix=False, add_bos=pre.add_bos,
                            clean_spaces=pre.clean_spaces)
        else:
            self.pre, self._regexes = None, ()
            defaults = dict(add_space_prefix=True, add_bos=True, clean_spaces=False)
        self.add_space_prefix = bool(get("tokenizer.ggml.add_space_prefix",
                                         defaults["add_space_prefix"]))
        self.add_bos = bool(get("tokenizer.ggml.add_bos_token", defaults["add_bos"]))
        self.add_eos = bool(get("tokenizer.ggml.add_eos_token", False))
        self.clean_spaces = defaults["clean_spaces"]
        self.ignore_merges = self.pre.ignore_merges if self.pre else False

    def _load_special_ids(self, get: MetadataGetter) -> None:
        """Special ids from the file, else llama.cpp's defaults, else found by their text."""
        n, spm = len(self.tokens), self.model == "llama"
        defaults = {"bos": 1 if spm else 11, "eos": 2 if spm else 11, "unk": 0 if spm else None}
        self.special: dict[str, int | None] = {}
        for name, keys in _SPECIAL_KEYS.items():
            tid = defaults.get(name)
            tid = tid if tid is not None and tid < n else None
            for key in keys:
                value = get(f"tokenizer.ggml.{key}_token_id", None)
                # llama.cpp keeps the default when the file's id is out of range
                if value is not None and 0 <= int(value) < n:
                    tid = int(value)
            self.special[name] = tid
        for name, texts in _FOUND_BY_TEXT.items():
            if self.special[name] is None:
                found = [self.token_to_id[t] for t in texts if t in self.token_to_id]
                tid = min(found, default=None)
                self.special[name] = tid
                if tid is not None:  # llama.cpp makes what it found a control token
                    self.attrs[tid] |= Attr.CONTROL
        self.bos_id, self.eos_id = self.special["bos"], self.special["eos"]
        self.eot_id, self.unk_id = self.special["eot"], self.special["unk"]
        if self.add_bos and self.bos_id is None:
            raise TokenizerError("tokenizer.ggml.add_bos_token is true but there is no BOS token")
        if self.add_eos and self.eos_id is None:
            raise TokenizerError("tokenizer.ggml.add_eos_token is true but there is no EOS token")

    def _mark_special_attrs(self) -> None:
        """llama.cpp's text-based fix-ups: end-of-generation tokens become control tokens,
        control tokens named 'unused' become unused, and a few model-family exceptions."""
        for i, a in enumerate(self.attrs):
            if a & Attr.CONTROL and "unused" in self.tokens[i]:
                self.attrs[i] = a | Attr.UNUSED
        eog = {self.special[k] for k in ("fim_pad", "fim_rep", "fim_sep")} - {None}
        for text in _EOG_TEXTS & self.token_to_id.keys():
            tid = self.token_to_id[text]
            eog.add(tid)
            self.attrs[tid] |= Attr.CONTROL
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss
            if text in self.token_to_id:
                self.attrs[self.token_to_id[text]] = Attr.USER_DEFINED
        eog |= {self.special[k] for k in ("eos", "eot", "eom")} - {None}
        texts = {self.tokens[i]: i for i in eog}
        has_call = "<|call|>" in texts or "<|calls|>" in texts
        if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
            eog.discard(texts["<|end|>"])  # o200k_harmony / solar-open: <|end|> ends a message
            self.attrs[texts["<|end|>"]] = Attr.USER_DEFINED
        if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
            eog.discard(texts["</s>"])  # gemma4 / plamo2: </s> is ordinary text
            self.attrs[texts["</s>"]] = Attr.NORMAL
        self.eog_ids = frozenset(eog)

    # --- encode -------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids for `text`. add_special adds BOS/EOS as the model's flags say;
        parse_special matches control tokens written in the text (llama-cli does for prompts)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes str, got {type(text).__name__}")
        text = _valid_unicode(text)
        fragments: list[str | int] = self._partition(text, parse_special) if text else []
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        if self.model == "gpt2":
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    for word in pre_split(frag, self._regexes):
                        out.extend(self._bpe_word(word))
        else:
            prev_special = True  # the first fragment gets the space prefix
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                out.extend(self._spm_fragment(frag.replace(" ", SPM_SPACE)))
                prev_special = False
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of the text, longest token first, each at all its
        non-overlapping occurrences left to right (llama.cpp tokenizer_st_partition)."""
        skip = Attr.CONTROL | Attr.UNKNOWN
        fragments: list[str | int] = [text]
        for tid in self.special_ids:
            tok = self.tokens[tid]
            if (not parse_special and self.attrs[tid] & skip) or tok not in text:
                continue
            split: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or tok not in frag:
                    split.append(frag)
                    continue
                for k, part in enumerate(frag.split(tok)):
                    if k:
                        split.append(tid)
                    if part:
                        split.append(part)
            fragments = split
        return fragments

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        ids = self._word_cache.get(word)
        if ids is None:
            ids = tuple(self._bpe_merge("".join(BYTE_TO_UNICODE[b] for b in word.encode())))
            if len(self._word_cache) >= _WORD_CACHE_MAX:
                self._word_cache.clear()
            self._word_cache[word] = ids
        return ids

    def _bpe_merge(self, word: str) -> list[int]:
        """Merge adjacent symbols lowest rank first, leftmost on ties (llm_tokenizer_bpe_session)
        on the byte-encoded word."""
        if self.ignore_merges and word in self.token_to_id:
            return [self.token_to_id[word]]
        sym = list(word)
        nxt = list(range(1, len(sym))) + [-1]
        prv = list(range(-1, len(sym) - 1))
        heap: list[tuple[int, int, int, str]] = []

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                rank = self.bpe_ranks.get((sym[left], sym[right]))
                if rank is not None:
                    heapq.heappush(heap, (rank, left, right, sym[left] + sym[right]))

        for i in range(1, len(sym)):
            push(i - 1, i)
        while heap:
            _, left, right, text = heapq.heappop(heap)
            if not sym[left] or not sym[right] or sym[left] + sym[right] != text:
                continue  # outdated: one side was merged since
            sym[left], sym[right] = text, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        out = []
        for s in sym:
            if not s:
                continue
            tid = self.token_to_id.get(s)
            if tid is not None:
                out.append(tid)
                continue
            # llama.cpp looks each UTF-8 byte up as a one-byte string; only ASCII can match
            out.extend(self.token_to_id[chr(b)] for b in s.encode()
                       if b < 0x80 and chr(b) in self.token_to_id)
        return out

    def _spm_fragment(self, text: str) -> list[int]:
        """Merge adjacent symbols highest score first, leftmost on ties; characters no token
        covers become byte tokens (llm_tokenizer_spm_session)."""
        sym = list(text)
        nxt = list(range(1, len(sym))) + [-1]
        prv = list(range(-1, len(sym) - 1))
        heap: list[tuple[float, int, int, str]] = []

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                merged = sym[left] + sym[right]
                tid = self.token_to_id.get(merged)
                if tid is not None:
                    heapq.heappush(heap, (-self.scores[tid], left, right, merged))

        for i in range(1, len(sym)):
            push(i - 1, i)
        while heap:
            _, left, right, text_lr = heapq.heappop(heap)
            if not sym[left] or not sym[right] or sym[left] + sym[right] != text_lr:
                continue
            sym[left], sym[right] = text_lr, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        out = []
        for s in sym:
            if s:
                tid = self.token_to_id.get(s)
                out.extend([tid] if tid is not None else (self._byte_token(b) for b in s.encode()))
        return out

    def _byte_token(self, byte: int) -> int:
        tid = self.token_to_id.get(f"<0x{byte:02X}>")
        if tid is None and byte < 0x80:
            tid = self.token_to_id.get(chr(byte))
        if tid is None:
            raise TokenizerError(f"vocabulary has no byte token <0x{byte:02X}> for byte fallback")
        return tid

    # --- decode -------------------------------------------------------------------------------

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes one token stands for (llama_token_to_piece). Control and unknown tokens
        give b'' unless `special`."""
        if not 0 <= token_id < len(self.tokens):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary "
                                 f"(0..{len(self.tokens) - 1})")
        attr, text = self.attrs[token_id], self.tokens[token_id]
        if attr & (Attr.CONTROL | Attr.UNKNOWN):
            return text.encode() if special else b""
        if attr & Attr.USER_DEFINED:
            return text.encode()
        if attr & Attr.NORMAL:
            if self.model == "llama":
                return text.replace(SPM_SPACE, " ").encode()
            return _gpt2_text_to_bytes(text)
        if attr & Attr.BYTE:
            return bytes([int(text[3:5], 16)])
        return b""

    def decode_bytes(self, ids: Iterable[int], special: bool = False) -> bytes:
        """llama_detokenize(remove_special=False): pieces joined, the SPM prefix space removed,
        spaces cleaned where the model says so."""
        out = bytearray()
        for k, tid in enumerate(ids):
            piece = self.token_bytes(tid, special)
            if k == 0 and self.add_space_prefix and piece.startswith(b" "):
                piece = piece[1:]
            out += piece
        return _clean_spaces(out) if self.clean_spaces else bytes(out)

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)


def _gpt2_text_to_bytes(text: str) -> bytes:
    """Map a byte-level BPE token back to bytes; characters outside the table are kept the way
    llama.cpp's llama_decode_text marks them."""
    try:
        return bytes(UNICODE_TO_BYTE[ch] for ch in text)
    except KeyError:
        out = bytearray()
        for ch in text:
            b = UNICODE_TO_BYTE.get(ch)
            if b is not None:
                out.append(b)
            else:
                out += f"[UNK_BYTE_0x{ch.encode().hex()}{text}]".encode()
        return bytes(out)


def _clean_spaces(text: bytearray) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces passes, byte for byte."""
    t = text
    if not t:
        return b""
    # 1: " ?", " !", " .", " ," lose the space
    out = bytearray(t[:1])
    for i in range(1, len(t)):
        if t[i - 1] == 0x20 and t[i] in b"?!.,":
            out.pop()
        out.append(t[i])
    # 2: " ' " becomes "'"
    t, out, i = out, bytearray(), 1
    out += t[:1]
    while i < len(t):
        x = t[i]
        if x == 0x27 and i + 1 < len(t) and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            out.pop()
            t[i + 1] = 0  # llama.cpp overwrites the skipped space, which the next test sees
            i += 1
        out.append(x)
        i += 1
    # 3: " 's", " 'm", " 're", " 've" lose the space
    t, out = out, bytearray(out[:1])
    for i in range(1, len(t)):
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < len(t):
            x1 = t[i + 1]
            x2 = t[i + 2] if i + 2 < len(t) else None
            if x1 in b"sm" or (x2 is not None and (x1, x2) in ((0x72, 0x65), (0x76, 0x65))):
                out.pop()
        out.append(x)
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Streaming decode
# ---------------------------------------------------------------------------------------------


class StreamDecoder:
    """Turn tokens into text as they come, holding back a UTF-8 character split across tokens
    until its last byte arrives (what llama-cli does before printing)."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer, self.special = tokenizer, special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id, self.special))

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character comes out as U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# ---------------------------------------------------------------------------------------------
# Metadata helpers
# ---------------------------------------------------------------------------------------------


def _get_str(get: MetadataGetter, key: str) -> str:
    value = get(key, None)
    if not isinstance(value, str):
        raise TokenizerError(f"{key} is missing or not a string (found {type(value).__name__})")
    return value


def _numeric_array(get: MetadataGetter, key: str, n: int, kind: type, default: Any) -> list:
    value = get(key, _MISSING)
    if value is _MISSING or value is None:
        return [default] * n
    try:
        if hasattr(value, "tolist"):  # numpy array: one C-level conversion
            values = value.astype(kind).tolist()
        else:
            values = [kind(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise TokenizerError(f"{key} is not a numeric array: {exc}") from exc
    if len(values) < n:
        raise TokenizerError(f"{key} has {len(values)} entries for {n} tokens")
    return values[:n]


def _valid_unicode(text: str) -> str:
    """Lone surrogates cannot be UTF-8; llama.cpp reads invalid UTF-8 as U+FFFD, so do we."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def metadata_getter(reader: Any) -> MetadataGetter:
    """A `get(key, default)` over a `gguf.GGUFReader`, for tools and tests until every caller
    goes through prima_ref.gguf_file."""
    fields = reader.fields

    def get(key: str, default: Any = None) -> Any:
        field = fields.get(key)
        return default if field is None else field.contents()

    return get
