"""Speculative decoding: a small draft model on rank 0 proposes, the target checks in one pass.

Per step the draft (held whole on rank 0, never split) proposes up to --draft-max tokens,
stopping early when its own confidence in a token falls below --draft-p-min; a proposal shorter
than --draft-min is dropped (a plain decode step instead), as in llama.cpp's server. The target
(one device, or the ring) evaluates [last token, draft...] in one batched forward and returns
the logits of every row; over the ring that is one pass with n_draft + 1 rows. By default each
rank takes those rows one at a time (--draft-verify rows), so every row is bit-equal to a
one-token pass: a batched product sums in another order for some types, and that rounding can
flip a near-tie. Then, position by position, with p the target's and q the draft's
distribution after the sampler chain:

- greedy (temperature <= 0): accept while the draft token is the target's argmax; the first
  mismatch is replaced by the target's argmax, so the output is the target's greedy output;
- sampling: accept x with probability min(1, p(x) / q(x)); on the first rejection emit a token
  drawn from norm(max(0, p - q)) and stop (Leviathan et al. 2023, Chen et al. 2023), so every
  emitted token follows the target's distribution exactly.

If every draft token is accepted the last row gives one more token. Rejected positions leave the
target's KV cache on every rank (Engine.truncate: a KV command round the ring) and the draft's.

Used by prima-cli (`-md`) and meant for prima-server: `add_draft_flags(parser)`, then
`load_draft(args, engine)` returns a SpeculativeDecoder (or None) whose `generate` takes and
returns what Engine.generate does.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from prima_ref.engine import Engine, Timings, peak_rss_mib
from prima_ref.sampling import Sampler
from prima_ref.tokenizer import StreamDecoder

# llama.cpp's common_params_speculative defaults (prima.cpp keeps them)
DRAFT_DEFAULTS = dict(
    draft_max=16,  # tokens proposed per step at most
    draft_min=5,  # shorter proposals are dropped: verifying them costs more than they save
    draft_p_min=0.9,  # stop drafting after a token the draft gives less than this probability
    draft_verify="rows",  # exact: see DraftParams.verify
)
# llama.cpp's examples/speculative: vocabularies may differ in size by this much (added special
# tokens) and must agree on every token text from this id on
SPEC_VOCAB_MAX_SIZE_DIFFERENCE = 128
SPEC_VOCAB_CHECK_START_TOKEN_ID = 5
# llama.cpp's draft sampler is top-k 10 at temperature 1: --draft-p-min compares with a token's
# probability among the draft's 10 best
DRAFT_CONFIDENCE_TOP_K = 10


def log(msg: str) -> None:
    print(f"[spec] {msg}", file=sys.stderr, flush=True)


# -- flags and parameters --------------------------------------------------------------------

@dataclass(frozen=True)
class DraftParams:
    n_max: int = DRAFT_DEFAULTS["draft_max"]
    n_min: int = DRAFT_DEFAULTS["draft_min"]
    p_min: float = DRAFT_DEFAULTS["draft_p_min"]
    # "rows": the verification pass computes its rows one at a time, each bit-equal to a
    # one-token pass, so greedy output is the target's exactly; "batched": one matrix product
    # for all rows, faster where the batched kernel is, equal only up to float rounding
    verify: str = DRAFT_DEFAULTS["draft_verify"]

    def __post_init__(self):
        if self.n_max < 1 or not 0 <= self.n_min <= self.n_max:
            raise ValueError(f"need 0 <= --draft-min ({self.n_min}) <= --draft-max ({self.n_max}) "
                             "and --draft-max >= 1")
        if not 0.0 <= self.p_min <= 1.0:
            raise ValueError(f"--draft-p-min must be within 0..1, got {self.p_min}")
        if self.verify not in ("rows", "batched"):
            raise ValueError(f"--draft-verify must be rows or batched, got {self.verify!r}")


def add_draft_flags(parser) -> None:
    """The speculative-decoding flags of prima-cli and prima-server (prima.cpp's names)."""
    g = parser.add_argument_group("speculative decoding (draft model on rank 0)")
    g.add_argument("-md", "--model-draft", metavar="FILE", help="draft GGUF sharing the model's "
                   "vocabulary, run whole on rank 0 to propose tokens")
    g.add_argument("--draft-max", "--draft", "--draft-n", type=int,
                   default=DRAFT_DEFAULTS["draft_max"], help="tokens to draft per step at most")
    g.add_argument("--draft-min", "--draft-n-min", type=int, default=DRAFT_DEFAULTS["draft_min"],
                   help="drop shorter drafts")
    g.add_argument("--draft-p-min", type=float, default=DRAFT_DEFAULTS["draft_p_min"],
                   help="stop drafting below this draft probability")
    g.add_argument("--draft-verify", choices=["rows", "batched"],
                   default=DRAFT_DEFAULTS["draft_verify"],
                   help="rows: verify row by row, bit-equal to decoding without a draft "
                   "(default); batched: one matrix product, equal up to float rounding")


def draft_params(args) -> DraftParams:
    return DraftParams(n_max=args.draft_max, n_min=args.draft_min, p_min=args.draft_p_min,
                       verify=args.draft_verify)


def load_draft(args, target: Engine) -> SpeculativeDecoder | None:
    """The decoder for `args.model_draft` beside `target`, or None without -md. Raises
    VocabMismatchError or ValueError (bad flags, bad file) with a message for the user."""
    if not getattr(args, "model_draft", None):
        return None
    params = draft_params(args)
    draft = Engine(args.model_draft, n_ctx=target.n_ctx, n_batch=target.n_batch)
    try:
        return SpeculativeDecoder(target, draft, params)
    except BaseException:
        draft.close()
        raise


class VocabMismatchError(ValueError):
    """Draft and target do not share a vocabulary; speculation would propose foreign tokens."""


def check_vocab(target, draft) -> None:
    """llama.cpp's checks (examples/speculative): same tokenizer type and special tokens, sizes
    within SPEC_VOCAB_MAX_SIZE_DIFFERENCE, the same text for every shared id from 5 on."""
    def refuse(why: str):
        raise VocabMismatchError(f"the draft does not share the target's vocabulary: {why}; use "
                                 "a draft of the same model family (same tokenizer)")

    if target.model != draft.model:
        refuse(f"its tokenizer is {draft.model!r}, the target's {target.model!r}")
    for what in ("add_bos", "bos_id", "add_eos", "eos_id"):
        a, b = getattr(target, what), getattr(draft, what)
        if a != b:
            refuse(f"{what} is {b}, the target's {a}")
    n_t, n_d = target.n_vocab, draft.n_vocab
    if abs(n_t - n_d) > SPEC_VOCAB_MAX_SIZE_DIFFERENCE:
        refuse(f"it has {n_d} tokens, the target {n_t}: {abs(n_t - n_d)} apart, at most "
               f"{SPEC_VOCAB_MAX_SIZE_DIFFERENCE} allowed")
    for i in range(SPEC_VOCAB_CHECK_START_TOKEN_ID, min(n_t, n_d)):
        if target.tokens[i] != draft.tokens[i]:
            refuse(f"token {i} differs: target {target.tokens[i]!r}, draft {draft.tokens[i]!r}")


# -- the acceptance rule ---------------------------------------------------------------------

def accept_or_resample(p: np.ndarray, q: np.ndarray, x: int,
                       rng: np.random.Generator) -> int | None:
    """One position of the rejection-sampling rule: None when draft token x (drawn from q) is
    accepted, else the replacement drawn from norm(max(0, p - q)). p over the target's
    vocabulary, q over the draft's (sizes may differ a little: q is cut or padded with zeros)."""
    n = p.size
    q_t = q[:n] if q.size >= n else np.concatenate([q, np.zeros(n - q.size)])
    p_x = p[x] if x < n else 0.0
    if rng.random() * q[x] < p_x:  # probability min(1, p(x) / q(x)); q(x) > 0 as x ~ q
        return None
    residual = np.maximum(p - q_t, 0.0)
    total = residual.sum()
    if total <= 0.0:  # p == q up to rounding: acceptance was certain, unreachable in exact math
        return int(rng.choice(n, p=p))
    return int(rng.choice(n, p=residual / total))


def draft_confidence(logits: np.ndarray, x: int, top_k: int = DRAFT_CONFIDENCE_TOP_K) -> float:
    """Token x's probability in the softmax of the draft's top_k logits (0 outside them)."""
    z = np.asarray(logits, dtype=np.float32)
    top = z[np.argpartition(z, -top_k)[-top_k:]].astype(np.float64) if z.size > top_k else z
    if z[x] < top.min():
        return 0.0
    m = top.max()
    return float(np.exp(np.float64(z[x]) - m) / np.exp(top - m).sum())


@dataclass
class SpecStats:
    n_steps: int = 0  # target verification passes after the first token
    n_drafted: int = 0  # draft tokens the target checked
    n_accepted: int = 0
    n_dropped: int = 0  # draft tokens discarded as shorter than --draft-min
    n_kv_removes: int = 0  # passes whose rejected rows left the cache (a KV round on a ring)
    draft_ms: float = 0.0
    verify_ms: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    def as_dict(self) -> dict:
        return dict(spec_steps=self.n_steps, spec_drafted=self.n_drafted,
                    spec_accepted=self.n_accepted, spec_dropped=self.n_dropped,
                    spec_kv_removes=self.n_kv_removes,
                    spec_acceptance_rate=self.acceptance_rate, spec_draft_ms=self.draft_ms,
                    spec_verify_ms=self.verify_ms)


# -- the decoder -----------------------------------------------------------------------------

class SpeculativeDecoder:
    """A target Engine (one device or rank 0 of a ring) and a draft Engine (one device)."""

    def __init__(self, target: Engine, draft: Engine, params: DraftParams = DraftParams()):
        if draft.ring is not None:
            raise ValueError("the draft model runs whole on rank 0; it cannot be a ring")
        check_vocab(target.tokenizer, draft.tokenizer)
        self.target, self.draft, self.params = target, draft, params
        # [last] + draft must fit one batch: one forward, one pass round the ring
        self.n_max = min(params.n_max, target.n_batch - 1)
        if self.n_max < params.n_max:
            log(f"--draft-max {params.n_max} lowered to {self.n_max}: one verification batch "
                f"holds n_draft + 1 <= -b {target.n_batch} tokens")

    def close(self) -> None:
        self.draft.close()

    def generate(self, prompt: list[int], n_predict: int, sampler: Sampler,
                 on_text: Callable[[str], None] | None = None,
                 stop: Callable[[int], bool] | None = None,
                 on_logits: Callable[[np.ndarray], None] | None = None,
                 ) -> tuple[list[int], Timings]:
        """Engine.generate with a draft: same arguments, same stopping rules, same output for
        greedy; timings.extra holds the acceptance statistics."""
        target, stats = self.target, SpecStats()
        timings = Timings(load_ms=target.load_ms + self.draft.load_ms)
        t0 = time.perf_counter()
        # the draft's prefill counts as prompt time too, so its first proposal is ready
        logits = target.prefill(prompt, sampler, timings, t0,
                                after=lambda: self._sync_draft(prompt))
        decoder = StreamDecoder(target.tokenizer)
        out: list[int] = []
        limit = n_predict if n_predict >= 0 else target.n_ctx
        t1 = time.perf_counter()

        def emit(token: int, n_evaluated: int) -> bool:
            """Output one target token; False when generation ends (Engine.generate's rules;
            n_evaluated is how many positions a one-token-per-pass run would hold now)."""
            sampler.accept(token)
            if not out:
                timings.ttft_ms = (time.perf_counter() - t0) * 1e3
            if target.tokenizer.is_eog(token):
                return False
            out.append(token)
            if on_text is not None:
                on_text(decoder.push(token))
            return not ((stop is not None and stop(token)) or len(out) == limit
                        or n_evaluated >= target.n_ctx)

        if on_logits is not None:
            on_logits(logits)
        if limit > 0 and emit(self._target_token(logits, sampler), len(target.tokens)):
            while self._step(prompt + out, sampler, limit - len(out), emit, on_logits, stats):
                pass
        if on_text is not None:
            on_text(decoder.flush())
        timings.eval_tokens = stats.n_steps
        timings.extra["generated_tokens"] = len(out)
        timings.extra.update(stats.as_dict())
        timings.eval_ms = (time.perf_counter() - t1) * 1e3
        timings.peak_rss_mib = peak_rss_mib()
        return out, timings

    # -- one step: draft, verify, keep what was accepted --------------------------------------

    def _step(self, context: list[int], sampler: Sampler, n_left: int, emit, on_logits,
              stats: SpecStats) -> bool:
        """Draft after `context` (its last token not yet in the target's cache), verify in one
        target pass, emit the accepted tokens and the target's own next one; False at the end."""
        target = self.target
        n_held = len(target.tokens)  # context[:-1]
        room = target.n_ctx - n_held - 1  # positions left after the last token's
        t0 = time.perf_counter()
        n_cap = min(self.n_max, n_left - 1, room)
        drafted, qs = self._propose(context, sampler, n_cap) if n_cap > 0 else ([], [])
        if len(drafted) < self.params.n_min:
            stats.n_dropped += len(drafted)
            drafted, qs = [], []
        t1 = time.perf_counter()
        rows = target.eval([context[-1]] + drafted, all_logits=True,
                           rows=self.params.verify == "rows")  # (1 + n_draft, n_vocab)
        stats.verify_ms += (time.perf_counter() - t1) * 1e3
        stats.draft_ms += (t1 - t0) * 1e3
        stats.n_steps += 1
        stats.n_drafted += len(drafted)
        for i, x in enumerate(drafted):
            if on_logits is not None:
                on_logits(rows[i])
            token = self._check(rows[i], x, qs[i], sampler)
            if token is not None:  # rejected: the target's replacement ends the step
                target.truncate(n_held + 1 + i)
                stats.n_kv_removes += 1
                stats.n_accepted += i
                return emit(token, n_held + 1 + i)
            if not emit(x, n_held + 1 + i):
                target.truncate(n_held + 1 + i)
                stats.n_kv_removes += 1
                stats.n_accepted += i + 1
                return False
        stats.n_accepted += len(drafted)
        if on_logits is not None:
            on_logits(rows[-1])
        return emit(self._target_token(rows[-1], sampler), n_held + 1 + len(drafted))

    def _propose(self, context: list[int], sampler: Sampler, n_cap: int) -> tuple[list[int], list]:
        """Up to n_cap draft tokens and the distribution each was drawn from (None: greedy)."""
        logits = self._sync_draft(context)
        drafted: list[int] = []
        qs: list[np.ndarray | None] = []
        greedy = sampler.params.temperature <= 0
        while True:
            if greedy:
                x, q = int(np.argmax(logits)), None
            else:
                q = _probs_after(sampler, logits, drafted)
                x = int(sampler.rng.choice(q.size, p=q))
            drafted.append(x)
            qs.append(q)
            if (len(drafted) >= n_cap or self.target.tokenizer.is_eog(x)
                    or draft_confidence(logits, x) < self.params.p_min):
                return drafted, qs
            logits = self.draft.eval([x])

    def _sync_draft(self, context: list[int]) -> np.ndarray:
        """Bring the draft's cache to `context` (drop what differs, evaluate the rest); its
        logits after the last token."""
        held = self.draft.tokens
        n = 0
        for a, b in zip(held, context, strict=False):
            if a != b:
                break
            n += 1
        n = min(n, len(context) - 1)
        self.draft.truncate(n)
        return self.draft.eval(context[n:])

    def _check(self, row: np.ndarray, x: int, q: np.ndarray | None, sampler: Sampler) -> int | None:
        """None when draft token x stands at this position, else the target's token instead."""
        if q is None:  # greedy draft: keep x iff it is the target's greedy choice
            token = self._target_token(row, sampler)
            return None if token == x else token
        return accept_or_resample(sampler.probs(row), q, x, sampler.rng)

    @staticmethod
    def _target_token(row: np.ndarray, sampler: Sampler) -> int:
        """What Sampler.sample would pick from this row, without recording it (emit does)."""
        p = sampler.params
        if p.temperature <= 0 and p.repeat_penalty == 1.0:
            return int(np.argmax(row))
        probs = sampler.probs(row)
        if p.temperature <= 0:
            return int(np.argmax(probs))
        return int(sampler.rng.choice(probs.size, p=probs))


def _probs_after(sampler: Sampler, logits: np.ndarray, extra: list[int]) -> np.ndarray:
    """The sampler's distribution with `extra` tokens appended to its repetition history."""
    if not extra or sampler.params.repeat_penalty == 1.0 or sampler.params.repeat_last_n <= 0:
        return sampler.probs(logits)
    saved = sampler.recent
    sampler.recent = deque(saved, maxlen=saved.maxlen)
    sampler.recent.extend(extra)
    try:
        return sampler.probs(logits)
    finally:
        sampler.recent = saved
