"""The batching loop behind prima-server: N slots, one engine, one thread.

Requests wait in a queue until a slot is free. Each turn of the loop evaluates one prompt
chunk (at most n_batch tokens) of one request that is still reading its prompt, then one
decode step for every request that is generating: their next tokens go through the model as
one batch (one forward, one pass round a ring). On one device whose decode rows give the
prefill tiles' bits (Scheduler.mix_prompts) a short prompt instead rides in the decode steps'
free rows, a piece a step (Scheduler._step), so the others do not wait for it. Where the
model's matrices have batched decode kernels (prima_ref.quants.batched: legacy quants, up to
8 rows) each row of that batch is bit-equal to a one-row step, so a request's greedy answer
does not depend on its neighbours; for other types the server times 1..N-row forwards at
startup and steps rows one by one where that measured cheaper (see Scheduler._split). A
request whose client went away is dropped at the next turn and its slot is free again.

Events go back to the HTTP side through `Job.emit` (thread-safe): ("text", str) pieces, then
exactly one ("done", finish_reason) or ("error", status, message).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from prima_ref.quants import batched, lanes, tiled
from prima_ref.sampling import Sampler
from prima_ref.tokenizer import StreamDecoder

IDLE_WAIT_S = 0.05
# a prompt rides in decode steps only when it is done within this many: a longer one (or one
# beside nearly MAX_ROWS decode rows) takes a prompt forward of its own, which the prefill
# tiles run faster than many steps of a few rows (8 streaming clients: 1 free row a step made
# the time to first token 5-7x longer)
MIX_MAX_STEPS = 3
CALIBRATION_REPEATS = 3


def log(msg: str) -> None:
    print(f"[server] {msg}", file=sys.stderr, flush=True)


@dataclass
class Job:
    id: int
    prompt: list[int]
    max_tokens: int  # generated tokens at most; the slot's context may end it sooner
    sampler: Sampler
    stops: list[str]
    emit: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    t_submit: float = field(default_factory=time.perf_counter)
    finished: bool = False  # set by the scheduler when the last event is out
    # state, touched by the scheduler thread only
    slot: int | None = None
    n_cached: int = 0  # prompt tokens found in the slot's cache
    n_fed: int = 0  # prompt tokens in the KV cache
    out: list[int] = field(default_factory=list)
    next_token: int | None = None
    text: str = ""
    sent: int = 0  # characters of text already emitted
    decoder: StreamDecoder | None = None


class Scheduler:
    def __init__(self, engine, max_queue: int = 64, calibrate: bool = True, spec=None):
        """spec: a SpeculativeDecoder (-md) over `engine`; it needs a single slot."""
        if spec is not None and engine.n_slots != 1:
            raise ValueError("speculative decoding serves one slot: use -np 1 with -md")
        self.engine, self.spec = engine, spec
        self.n_slots = engine.n_slots
        self.slots: list[Job | None] = [None] * self.n_slots
        self.aligned = [0] * self.n_slots  # cached positions computed in whole prompt chunks
        self.pending: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.jobs: dict[int, Job] = {}  # every job not yet finished, by id
        self._lock = threading.Lock()
        self._next_id = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.failure: str | None = None  # set when the engine cannot serve any more
        # counters, and seconds the loop spent in prompt forwards, decode forwards, and turning
        # logits into tokens and text (sampling, detokenizing, stop strings, emitting)
        self.stats = {"decode_steps": 0, "decode_rows": 0, "prompt_chunks": 0,
                      "prompt_rows_mixed": 0, "prompt_s": 0.0, "decode_s": 0.0, "sample_s": 0.0}
        self.step_s: dict[int, float] = {}  # wall time of a decode forward, by row count
        self.batched = bool(getattr(engine.model, "batched_decode", False))
        # a prompt's next tokens ride in the free rows of a decode step where those rows give
        # the bits of the prefill tiles (rows in lanes: quants/lanes.py equals quants/tiled.py),
        # on one device (a ring's other ranks may run other kernels)
        self.mix_prompts = (self.batched and engine.ring is None and spec is None
                            and lanes.available() and tiled.enabled())
        if self.n_slots > 1 and self.batched:
            log(f"decode steps: all active slots in one batched forward (up to "
                f"{batched.MAX_ROWS} rows, each bit-equal to a one-row step)")
        elif calibrate and self.n_slots > 1:
            self._calibrate()
        self._thread = threading.Thread(target=self._run, name="prima-scheduler", daemon=True)
        self._thread.start()

    # -- called from the HTTP side ---------------------------------------------------------------

    def new_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def submit(self, job: Job) -> None:
        """Queue a job; raises queue.Full when too many wait."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        with self._lock:
            self.jobs[job.id] = job
        try:
            self.pending.put_nowait(job)
        except queue.Full:
            with self._lock:
                self.jobs.pop(job.id, None)
            raise
        self._wake.set()

    def cancel(self, job_id: int) -> bool:
        with self._lock:
            job = self.jobs.get(job_id)
        if job is None:
            return False
        job.cancelled.set()
        self._wake.set()
        return True

    def busy_slots(self) -> int:
        return sum(j is not None for j in self.slots)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    # -- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drop_cancelled()
                if self.spec is not None:
                    worked = self._speculative_job()
                else:
                    self._admit()
                    if self.mix_prompts:  # a prompt piece rides in a decode step where it can
                        worked, fed = self._decode_step()
                        if not fed:
                            worked = self._prompt_step() or worked
                    else:
                        worked = self._prompt_step()
                        worked = self._decode_step()[0] or worked
                if not worked:
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
        except Exception as err:  # the engine failed (a ring rank died): nothing more can run
            self.failure = f"{type(err).__name__}: {err}"
            log(f"engine failed, refusing new requests: {self.failure}")
            for job in [j for j in self.slots if j is not None] + self._drain_pending():
                self._finish(job, None, error=(503, f"the model failed: {self.failure}"))

    def _drain_pending(self) -> list[Job]:
        out = []
        while True:
            try:
                out.append(self.pending.get_nowait())
            except queue.Empty:
                return out

    def _drop_cancelled(self) -> None:
        for job in self.slots:
            if job is not None and job.cancelled.is_set():
                self._finish(job, "cancelled")

    def _admit(self) -> None:
        while None in self.slots:
            try:
                job = self.pending.get_nowait()
            except queue.Empty:
                return
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
                continue
            slot = self._pick_slot(job.prompt)
            job.slot = slot
            self.slots[slot] = job
            if self.engine.ring is not None:
                self.engine.ring.begin_request()
            job.n_cached = job.n_fed = self._reuse(job.prompt, slot)
            for tok in job.prompt:
                job.sampler.accept(tok)
            job.decoder = StreamDecoder(self.engine.tokenizer)

    def _reuse(self, prompt: list[int], slot: int) -> int:
        """Keep the slot's cached prompt chunks that a fresh run would compute the same way.

        Only whole n_batch chunks counted from position 0 are reused: a prompt evaluated from
        another boundary (or a generated token evaluated alone) goes through the kernels in a
        different batch and rounds differently, and greedy answers must equal prima-cli's."""
        nb = self.engine.n_batch
        cached = self.engine.slot_tokens[slot]
        n = _common_prefix(cached, prompt)
        n = min(n, self.aligned[slot], len(prompt) - 1) // nb * nb
        if n < len(cached):
            self.engine.kv_remove(n, slot)
        self.aligned[slot] = len(prompt) // nb * nb
        return n

    def _pick_slot(self, prompt: list[int]) -> int:
        """The free slot whose cache shares the longest prefix with the prompt (prompt cache)."""
        best, best_n = None, -1
        for s, job in enumerate(self.slots):
            if job is not None:
                continue
            n = min(_common_prefix(self.engine.slot_tokens[s], prompt), self.aligned[s])
            if n > best_n:
                best, best_n = s, n
        return best

    def _reading(self) -> Job | None:
        """The request still reading its prompt whose prompt came first."""
        reading = [j for j in self.slots if j is not None and j.next_token is None and not j.out
                   and j.n_fed < len(j.prompt)]
        return min(reading, key=lambda j: j.id) if reading else None

    def _prompt_step(self) -> bool:
        """One chunk of one request's prompt; the request whose prompt came first goes first."""
        job = self._reading()
        if job is None:
            return False
        chunk = job.prompt[job.n_fed : job.n_fed + self.engine.n_batch]
        t0 = time.perf_counter()
        logits = self.engine.eval(chunk, slot=job.slot)
        t1 = time.perf_counter()
        job.n_fed += len(chunk)
        self.stats["prompt_chunks"] += 1
        if job.n_fed == len(job.prompt):
            self._take(job, logits)
        self._add_times(prompt_s=t1 - t0, sample_s=time.perf_counter() - t1)
        return True

    def _add_times(self, **seconds: float) -> None:
        for name, s in seconds.items():
            self.stats[name] += s

    def _decode_step(self) -> tuple[bool, bool]:
        """A decode step for every generating request (with mix_prompts, plus a piece of the
        reading request's prompt where it is done within MIX_MAX_STEPS): (stepped, fed a
        prompt piece)."""
        rows = [j for j in self.slots if j is not None and j.next_token is not None]
        if not rows:
            return False, False
        reader = self._reading() if self.mix_prompts else None
        room = batched.MAX_ROWS - len(rows)
        if reader is not None and room > 0 and \
                -(-(len(reader.prompt) - reader.n_fed) // room) <= MIX_MAX_STEPS:
            self._step(rows, reader)
            return True, True
        for group in [[j] for j in rows] if self._split(len(rows)) else [rows]:
            self._step(group)
        return True, False

    def _step(self, rows: list[Job], reader: Job | None = None) -> None:
        """One forward of the rows' next tokens and, with a reader, as many of its prompt
        tokens as the batched kernels have rows left: the prompt goes in beside the decode
        rows instead of stopping them for a prompt forward of its own."""
        piece = [] if reader is None else \
            reader.prompt[reader.n_fed : reader.n_fed + batched.MAX_ROWS - len(rows)]
        done = reader is not None and reader.n_fed + len(piece) == len(reader.prompt)
        slots = [j.slot for j in rows] + ([reader.slot] * len(piece) if piece else [])
        tokens = [j.next_token for j in rows] + piece
        want = None  # logits of every row, or of the decode rows and a finished prompt's last
        if reader is not None:
            want = list(range(len(rows))) + ([len(slots) - 1] if done else [])
        t0 = time.perf_counter()
        logits = self.engine.step(slots, tokens, logit_rows=want)
        t1 = time.perf_counter()
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(rows)
        self.stats["prompt_rows_mixed"] += len(piece)
        if reader is not None:
            reader.n_fed += len(piece)
        for job, row in zip(rows, logits[: len(rows)], strict=True):
            job.next_token = None
            self._take(job, row)
        if done:
            self._take(reader, logits[len(rows)])
        self._add_times(decode_s=t1 - t0, sample_s=time.perf_counter() - t1)

    def _speculative_job(self) -> bool:
        """With a draft model: the next request runs whole through SpeculativeDecoder.generate
        (draft, one verifying target pass, KV trimmed on every rank), its text streamed as the
        target accepts it; the same tokens prima-cli -md gives."""
        try:
            job = self.pending.get_nowait()
        except queue.Empty:
            return False
        if job.cancelled.is_set():
            self._finish(job, "cancelled")
            return True
        job.slot, self.slots[0] = 0, job
        self.aligned[0] = 0  # the decoder evaluates in its own batches: no chunk reuse after it
        found = False

        def on_text(piece: str) -> None:
            nonlocal found
            if not found:
                job.text += piece
                found = self._emit_text(job)

        out, t = self.spec.generate(job.prompt, job.max_tokens, job.sampler, on_text=on_text,
                                    stop=lambda _tok: found or job.cancelled.is_set())
        x = t.extra
        log(f"task {job.id}: {len(out)} tokens in {t.eval_tokens} target passes, "
            f"{x['spec_accepted']}/{x['spec_drafted']} drafted tokens accepted")
        if job.cancelled.is_set():
            reason = "cancelled"
        elif found or self._emit_text(job, final=True):
            reason = "stop"
        elif len(out) >= job.max_tokens or len(self.engine.tokens) >= self.engine.n_ctx:
            reason = "length"
        else:
            reason = "stop"  # an end-of-generation token
        self._finish(job, reason, flushed=True)
        return True

    def _calibrate(self) -> None:
        """Time a decode forward of 1..n_slots rows (best of CALIBRATION_REPEATS, wall time,
        so a ring's passes count) on throw-away tokens; the slots are emptied again."""
        eng = self.engine
        for n in (1, 2):  # warm: kernels loaded from numba's cache, weight pages mapped in
            eng.decode(list(range(n)), [eng.tokenizer.bos_id or 0] * n)
        for n in range(1, self.n_slots + 1):
            best = float("inf")
            for _ in range(CALIBRATION_REPEATS):
                t0 = time.perf_counter()
                eng.decode(list(range(n)), [eng.tokenizer.bos_id or 0] * n)
                best = min(best, time.perf_counter() - t0)
            self.step_s[n] = best
        for s in range(self.n_slots):
            eng.kv_remove(0, s)
        split = [n for n in range(2, self.n_slots + 1) if self._split(n)]
        log("decode forward by rows: " + ", ".join(f"{n}: {t * 1e3:.1f} ms"
                                                   for n, t in self.step_s.items())
            + (f"; {split} rows go one by one (cheaper)" if split else ""))

    def _split(self, n_rows: int) -> bool:
        """Step the rows one by one where that measured cheaper than one batch of them: for
        types without batched decode kernels a batched product can cost more than its rows
        alone (a matmul that pads a batch to 8 token lanes costs about the same for 2 rows as
        for 8)."""
        if n_rows == 1 or n_rows not in self.step_s:
            return False
        return n_rows * self.step_s[1] < self.step_s[n_rows]

    def _take(self, job: Job, logits: np.ndarray) -> None:
        """Sample the job's next token from its logits; emit text, or finish."""
        token = job.sampler.sample(logits)
        if self.engine.tokenizer.is_eog(token):
            return self._finish(job, "stop")
        job.out.append(token)
        job.text += job.decoder.push(token)
        if self._emit_text(job):
            return self._finish(job, "stop", flushed=True)
        full = len(self.engine.slot_tokens[job.slot]) >= self.engine.n_ctx
        if len(job.out) >= job.max_tokens or full:
            return self._finish(job, "length")
        job.next_token = token

    def _emit_text(self, job: Job, final: bool = False) -> bool:
        """Emit what is safe to show; True when a stop string was found (text cut before it)."""
        text = job.text
        for stop in job.stops:
            at = text.find(stop, max(0, job.sent - len(stop) + 1))
            if at >= 0:
                job.text = text = text[:at]
                final = True
                found = True
                break
        else:
            found = False
        safe = len(text) if final else len(text) - _held_back(text, job.stops)
        if safe > job.sent:
            job.emit(("text", text[job.sent : safe]))
            job.sent = safe
        return found

    def _finish(self, job: Job, reason: str | None, *, flushed: bool = False,
                error: tuple[int, str] | None = None) -> None:
        if job.slot is not None and self.slots[job.slot] is job:
            self.slots[job.slot] = None
        with self._lock:
            self.jobs.pop(job.id, None)
        job.finished = True
        if error is not None:
            job.emit(("error", *error))
            return
        if not flushed and job.decoder is not None and reason != "cancelled":
            job.text += job.decoder.flush()
            if self._emit_text(job, final=True):
                reason = "stop"
        job.emit(("done", reason))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that could be the start of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
