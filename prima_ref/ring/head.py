"""Rank 0 of the ring: embedding, its own windows, the output head; forms and drives the ring.

Per batch of tokens (a prompt batch or one decoded token) rank 0 embeds, then for each round r
sends the activations to rank 1 (seq r*M), waits for them back from rank M-1 (seq r*M + M-1)
and runs its own window of round r; after the last round it computes the logits. Every wait
polls with a short timeout and checks the control thread's view of the ring, so a dead rank
ends the request with an error naming it within the heartbeat timeout.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import nullcontext

import numpy as np
import zmq

from prima_ref.model.transformer import row_by_row, select_logit_rows
from prima_ref.ring import protocol as P
from prima_ref.ring.control import HeadControl, log
from prima_ref.ring.memory import WindowPager
from prima_ref.ring.topology import RingOptions

POLL_MS = 20


class RingError(RuntimeError):
    """The ring cannot serve the request (a rank died, refused, or never joined)."""


class Head:
    def __init__(self, opts: RingOptions, gguf, model, *, n_batch: int, sha256: str):
        self.opts, self.ep, self.layout = opts, opts.endpoints, opts.layout
        self.model, self.n_batch, self.sha256 = model, n_batch, sha256
        self.M, self.k = self.ep.world, self.layout.k
        self.windows = [list(w) for w in self.layout.windows[0]]
        self.n_embd = model.cfg.n_embd
        self.session = int.from_bytes(os.urandom(4), "little") or 1
        self.request = self.step = 0
        self.hop_ms: float | None = None
        self.ctx = zmq.Context()
        self.control = HeadControl(self.ctx, self.ep, self.session)
        self.spin_s = P.spin_seconds()
        self.pull = P.data_pull(self.ctx, f"tcp://{self.ep.bind_host}:{self.ep.data_ports[0]}",
                                n_batch * (self.n_embd + 2) * 4 + 4096)
        self.push = P.data_push(self.ctx, self.ep.data_addr(1), send_timeout_ms=2000)
        self.pager = WindowPager(gguf, self.windows, prefetch=opts.prefetch, force=opts.force,
                                 release=opts.release)
        self.control.start()
        try:
            self._form()
        except BaseException:
            self.close()
            raise

    # -- forming the ring ------------------------------------------------------------------------

    def _form(self) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.opts.join_timeout_s
        workers = range(1, self.M)
        self._wait_for(lambda: len(self.control.hellos) == self.M - 1, deadline, "joined",
                       lambda: [r for r in workers if r not in self.control.hellos])
        for r, hello in sorted(self.control.hellos.items()):
            if hello.get("sha256") != self.sha256:
                raise RingError(
                    f"{self.ep.describe(r)} holds a different model: {hello.get('file')} has sha256 "
                    f"{str(hello.get('sha256'))[:16]}..., the ring runs {self.sha256[:16]}...; copy "
                    "the same GGUF file to every device")
        self.control.send(P.CONFIG, {"layout": self.layout.as_json(), "n_ctx": self.model.n_ctx,
                                     "n_batch": self.n_batch, "n_embd": self.n_embd,
                                     "n_slots": self.model.n_slots, "sha256": self.sha256})
        self._wait_for(lambda: len(self.control.ready) == self.M - 1, deadline, "loaded its layers",
                       lambda: [r for r in workers if r not in self.control.ready])
        probe_ms = self.probe(self.n_embd) * 1e3
        self.hop_ms = probe_ms / self.M
        log(0, f"ring formed: {self.M} ranks, k={self.k}, session {self.session:08x}, "
               f"{time.monotonic() - t0:.1f} s; probe round trip {probe_ms:.2f} ms "
               f"({self.hop_ms:.3f} ms per hop)")

    def _wait_for(self, done, deadline: float, what: str, missing) -> None:
        while not done():
            self._check_health()
            if time.monotonic() > deadline:
                raise RingError(f"the ring did not form within {self.opts.join_timeout_s:.0f} s: "
                                + "; ".join(self._why_missing(r, what) for r in missing()))
            time.sleep(POLL_MS / 1e3)

    def _why_missing(self, rank: int, what: str) -> str:
        host = self.ep.hosts[rank]
        if host is None:
            return (f"rank {rank} never {what} (signal port {self.ep.signal_ports[rank]}; is "
                    f"prima-cli running there with --rank {rank}?)")
        reachable = _port_open(host, self.ep.signal_ports[rank])
        state = "its port is open" if reachable else "nothing listens there"
        return f"{self.ep.describe(rank)} never {what} ({state})"

    # -- one pass round the ring -----------------------------------------------------------------

    def begin_request(self) -> None:
        self.request += 1
        self.step = 0

    def forward(self, tokens, start_pos: int, all_logits: bool = False,
                rows: bool = False) -> np.ndarray:
        """Logits (1, n_vocab) of the last of `tokens` (all_logits: of every one, (n_tokens,
        n_vocab)), computed in one pass round the ring; rows: every rank takes the rows one at
        a time (DATA_ROWS), each bit-equal to a one-token pass."""
        positions = np.arange(start_pos, start_pos + len(tokens), dtype=np.int32)
        return self.forward_rows(tokens, positions, None, last_only=not all_logits, rows=rows)

    def forward_rows(self, tokens, positions, slots=None, last_only: bool = False,
                     rows: bool = False, logit_rows=None) -> np.ndarray:
        """One pass round the ring for rows of several sequences (row t: slots[t] at
        positions[t]; slots None: all slot 0); logits of every row, of the last one, or of
        the rows logit_rows lists."""
        tokens = np.asarray(tokens, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int32)
        if tokens.size > self.n_batch:
            raise ValueError(f"{tokens.size} tokens exceed the ring's batch of {self.n_batch}")
        x = self.model.embed(tokens)  # (n_tokens, n_embd)
        self.step += 1
        kind = P.DATA_ROWS if rows else P.DATA
        with row_by_row() if rows else nullcontext():
            return self._rounds(kind, positions, x, slots, last_only, logit_rows)

    def _rounds(self, kind: int, positions: np.ndarray, x: np.ndarray, slots, last_only: bool,
                logit_rows=None):
        for r in range(self.k):
            self._send(P.data_frames(self._header(kind, r * self.M), positions, x, slots))
            msg = self._receive(kind, (r + 1) * self.M - 1)
            if not np.array_equal(msg.positions, positions):
                raise RingError(f"rank {self.M - 1} returned positions {msg.positions[:4]}..., "
                                f"sent {positions[:4]}...")
            x = msg.x
            window = self.windows[r]
            if window:
                x = self.model.forward_layers(x, positions, window[0], window[-1] + 1, slots)
                self.pager.after_compute(r)
        return self.model.logits(select_logit_rows(x, last_only, logit_rows))

    def kv_remove(self, p0: int = 0, p1: int | None = None, slot: int = 0) -> None:
        """Forget cached positions [p0, p1) of a slot on every rank; returns once the ring has
        done it."""
        self.model.kv_remove(p0, p1, slot)
        self.step += 1
        h = self._header(P.KV, 0)
        self._send(P.kv_frames(P.Header(P.KV, 0, self.session, h.request, h.step, 0, p0,
                                        P.KV_END if p1 is None else p1), slot))
        self._receive(P.KV, self.M - 1)

    def probe(self, n_floats: int) -> float:
        """Seconds for a float32 payload of n_floats to go round the ring once, no compute."""
        payload = np.zeros(n_floats, dtype=np.float32)
        self.step += 1
        h = self._header(P.PROBE, 0)
        t0 = time.perf_counter()
        self._send([P.Header(P.PROBE, 0, self.session, h.request, h.step, 0, n_floats).pack(), payload])
        self._receive(P.PROBE, self.M - 1)
        return time.perf_counter() - t0

    def _header(self, kind: int, seq: int) -> P.Header:
        return P.Header(kind, 0, self.session, self.request, self.step, seq)

    def _send(self, frames) -> None:
        self._check_health()
        try:
            self.push.send_multipart(frames, copy=False)
        except zmq.Again:
            self._check_health()
            raise RingError(f"cannot send to {self.ep.describe(1)}: it is not connected") from None

    def _receive(self, kind: int, seq: int) -> P.Message:
        want = (self.request, self.step, seq)
        deadline = time.monotonic() + self.opts.reply_timeout_s
        while True:
            self._check_health()
            if P.wait_readable(self.pull, POLL_MS, self.spin_s):
                frames = self.pull.recv_multipart(copy=False)
                try:
                    msg = P.parse(frames, n_embd=self.n_embd, max_tokens=self.n_batch)
                except P.ProtocolError as err:
                    log(0, f"dropped a malformed message: {err}")
                    continue
                h = msg.header
                if h.session != self.session or h.key != want or h.kind != kind or h.sender != self.M - 1:
                    log(0, f"dropped stale {h}: waiting for {P.KIND_NAMES[kind]} request {want[0]} "
                           f"step {want[1]} seq {want[2]}")
                    continue
                return msg
            if time.monotonic() > deadline:
                raise RingError(f"no reply from the ring within {self.opts.reply_timeout_s:.0f} s "
                                "although every rank sends heartbeats")

    def _check_health(self) -> None:
        c = self.control
        if c.failure is not None:
            raise RingError(f"rank 0's control thread failed: {c.failure}")
        if not c.errors.empty():
            rank, text = c.errors.get()
            raise RingError(f"rank {rank} failed: {text}")
        silent = c.silent_ranks(self.opts.heartbeat_timeout_s)
        if silent:
            rank, quiet_s = silent[0]
            raise RingError(f"{self.ep.describe(rank)} stopped answering (no heartbeat for "
                            f"{quiet_s:.1f} s); the request is abandoned")

    # -- shutdown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Tell every rank to stop (STOP round the signal ring) and release the sockets."""
        self.control.stop()
        for s in (self.pull, self.push):
            s.close(linger=0)
        self.pager.close()
        if self.control.is_alive():
            self.ctx.destroy(linger=0)
        else:
            self.ctx.term()


def _port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
