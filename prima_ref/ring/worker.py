"""Ranks 1..M-1: join the ring, hold some layers, and pass activations on.

A worker checks its model file against the plan (SHA-256), says HELLO to rank 0, takes the
CONFIG (layout, context, batch), builds weights and KV for its own layers only, says READY,
then serves: every DATA message for its place in the ring runs one window and goes to the next
rank; KV commands are applied and passed on; PROBEs are passed on untouched. It leaves on
STOP, or when rank 0 has been silent for master_timeout_s.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import zmq

from prima_ref import repacked
from prima_ref.gguf_file import GGUFModel
from prima_ref.model.config import ModelConfig
from prima_ref.model.transformer import Transformer, row_by_row
from prima_ref.ring import protocol as P
from prima_ref.ring.control import WorkerControl, log
from prima_ref.ring.memory import (
    WindowPager,
    anon_rss_bytes,
    mapped_file_rss_bytes,
    proc_status_bytes,
)
from prima_ref.ring.topology import Layout, RingOptions, model_sha256

POLL_MS = 50
EXIT_OK, EXIT_LOST_MASTER, EXIT_REFUSED = 0, 1, 2


class _Refusal(Exception):
    pass


def serve(opts: RingOptions, model_path) -> int:
    ep = opts.endpoints
    rank = ep.rank
    sha = model_sha256(model_path)
    if opts.sha256 and sha != opts.sha256:
        log(rank, f"refusing to join: {Path(model_path).name} has sha256 {sha[:16]}..., the plan "
                  f"names {opts.sha256[:16]}...; copy the plan's model to this device")
        return EXIT_REFUSED
    gguf = GGUFModel.open(model_path)
    ctx = zmq.Context()
    hello = {"pid": os.getpid(), "sha256": sha, "file": Path(model_path).name,
             "n_layers": ModelConfig.from_gguf(gguf).n_layer}
    control = WorkerControl(ctx, ep, hello)
    control.start()
    worker = None
    try:
        config = _wait_config(control, opts)
        if config is None:
            if control.refusal:  # a CurveZMQ key mismatch (control.py logged it)
                return EXIT_REFUSED
            return EXIT_LOST_MASTER if not control.stopped.is_set() else EXIT_OK
        worker = _Worker(opts, gguf, ctx, control, config, sha)
        return worker.loop()
    except _Refusal as err:
        log(rank, f"refusing to join: {err}")
        control.send(P.ERROR, {"error": f"refused to join: {err}"})
        return EXIT_REFUSED
    finally:
        if worker is not None:
            worker.close()
        control.stop()
        ctx.destroy(linger=0) if control.is_alive() else ctx.term()


def _wait_config(control: WorkerControl, opts: RingOptions) -> dict | None:
    deadline = time.monotonic() + opts.join_timeout_s
    while time.monotonic() < deadline:
        if control.stopped.is_set():
            return None
        try:
            return control.config.get(timeout=POLL_MS / 1e3)
        except Exception:  # queue.Empty
            pass
    log(opts.endpoints.rank, f"no CONFIG from {opts.endpoints.describe(0)} within "
                             f"{opts.join_timeout_s:.0f} s; leaving")
    return None


class _Worker:
    def __init__(self, opts: RingOptions, gguf, ctx, control: WorkerControl, config: dict, sha: str):
        ep = opts.endpoints
        self.opts, self.ep, self.rank, self.control = opts, ep, ep.rank, control
        self.layout = Layout.from_json(config["layout"])
        if config.get("sha256") != sha:
            raise _Refusal(f"rank 0 runs a model with sha256 {str(config.get('sha256'))[:16]}..., "
                           f"this device holds {sha[:16]}...")
        if opts.layout is not None and opts.layout != self.layout:
            raise _Refusal("rank 0's layout differs from this rank's plan file; give every rank "
                           "the same plan")
        if self.layout.world != ep.world:
            raise _Refusal(f"rank 0's layout has {self.layout.world} ranks, --world says {ep.world}")
        self.windows = [list(w) for w in self.layout.windows[self.rank]]
        self.n_ctx, self.n_batch, self.n_embd = int(config["n_ctx"]), int(config["n_batch"]), int(config["n_embd"])
        self.n_slots = int(config.get("n_slots", 1))
        t0 = time.perf_counter()
        if repacked.enabled():  # this rank's layers, repacked where the CPU reads them
            gguf = repacked.open_copy(gguf, self.layout.layers_of(self.rank), head=False)
        self.model = Transformer(gguf, self.n_ctx, layers=self.layout.layers_of(self.rank), head=False,
                                 n_slots=self.n_slots, gpu_layers=opts.gpu_layers,
                                 gpu_mem_gib=opts.gpu_mem_gib)
        self.pager = WindowPager(gguf, self.windows, prefetch=opts.prefetch, force=opts.force,
                                 release=opts.release)
        self.gguf_path = gguf.path
        self.spin_s = P.spin_seconds()
        self.pull = P.data_pull(ctx, f"tcp://{ep.bind_host}:{ep.data_ports[self.rank]}",
                                self.n_batch * (self.n_embd + 2) * 4 + 4096)
        self.push = P.data_push(ctx, ep.data_addr(ep.next_rank), send_timeout_ms=2000)
        self.last_key = (0, 0, -1)
        self.stats = {"rank": self.rank, "steps": 0, "compute_ms": 0.0, "dropped": 0,
                      "share_bytes": self.pager.share_bytes, "free_bytes_at_start": self.pager.free_bytes,
                      "release_active": self.pager.release, "prefetch": self.pager.prefetch,
                      "anon_rss_max_bytes": proc_status_bytes("RssAnon")}
        control.send(P.READY, {"load_ms": (time.perf_counter() - t0) * 1e3,
                               "layers": self.layout.layers_of(self.rank)})
        log(self.rank, f"holds layers {_spans(self.windows)} ({self.pager.share_bytes / 2**20:.1f} MiB"
                       f"{', release on' if self.pager.release else ''}"
                       f"{', prefetch on' if self.pager.prefetch else ''}); serving")

    def loop(self) -> int:
        c = self.control
        while True:
            if c.stopped.is_set():
                log(self.rank, "STOP from rank 0; leaving")
                return EXIT_OK
            if c.failure is not None:
                raise RuntimeError(f"control thread failed: {c.failure}")
            if c.master_silent_s() > self.opts.master_timeout_s:
                log(self.rank, f"rank 0 silent for {c.master_silent_s():.1f} s; leaving the ring")
                return EXIT_LOST_MASTER
            if P.wait_readable(self.pull, POLL_MS, self.spin_s):
                self._handle(self.pull.recv_multipart(copy=False))

    def _handle(self, frames) -> None:
        try:
            msg = P.parse(frames, n_embd=self.n_embd, max_tokens=self.n_batch)
            self._check(msg.header, msg)
        except P.ProtocolError as err:
            self.stats["dropped"] += 1
            log(self.rank, f"dropped a message: {err}")
            return
        h = msg.header
        r = h.seq // self.ep.world
        out = P.Header(h.kind, self.rank, h.session, h.request, h.step, h.seq + 1, h.a, h.b)
        try:
            if h.kind in P.ACTIVATIONS:
                frames_out = P.data_frames(out, msg.positions, self._compute(r, msg), msg.slots)
            elif h.kind == P.KV:
                self.model.kv_remove(h.a, None if h.b == P.KV_END else h.b, msg.slot)
                frames_out = P.kv_frames(out, msg.slot)
            else:
                frames_out = [out.pack(), frames[1]]
        except (ValueError, IndexError) as err:
            self.control.send(P.ERROR, {"error": f"{type(err).__name__}: {err}"})
            return
        self.last_key = h.key
        try:
            self.push.send_multipart(frames_out, copy=False)
        except zmq.Again:
            self.control.send(P.ERROR, {"error": f"cannot send to {self.ep.describe(self.ep.next_rank)}"})

    def _check(self, h: P.Header, msg: P.Message) -> None:
        M = self.ep.world
        if h.session != self.control.session:
            raise P.ProtocolError(f"{h} is not from this ring's session")
        if h.kind not in P.DATA_KINDS:
            raise P.ProtocolError(f"{h} does not belong on the data ring")
        if h.sender != self.rank - 1:
            raise P.ProtocolError(f"{h} should come from rank {self.rank - 1}")
        if h.key <= self.last_key:
            raise P.ProtocolError(f"stale {h}: already past request {self.last_key[0]} step "
                                  f"{self.last_key[1]} seq {self.last_key[2]}")
        rounds = self.layout.k if h.kind in P.ACTIVATIONS else 1
        if h.seq % M != self.rank - 1 or h.seq // M >= rounds:
            raise P.ProtocolError(f"{h} is not for this rank's place in the ring")
        if msg.positions is not None and (msg.positions.min() < 0 or msg.positions.max() >= self.n_ctx):
            raise P.ProtocolError(f"{h} has positions outside 0..{self.n_ctx - 1}")
        if msg.slots is not None and (msg.slots.min() < 0 or msg.slots.max() >= self.n_slots):
            raise P.ProtocolError(f"{h} has slot ids outside 0..{self.n_slots - 1}")
        if h.kind == P.KV and msg.slot >= self.n_slots:
            raise P.ProtocolError(f"{h} names slot {msg.slot}, this ring has {self.n_slots}")

    def _compute(self, r: int, msg: P.Message):
        t0 = time.perf_counter()
        window = self.windows[r]
        with row_by_row() if msg.header.kind == P.DATA_ROWS else nullcontext():
            x = self.model.forward_layers(msg.x, msg.positions, window[0], window[-1] + 1,
                                          msg.slots)
        self.pager.after_compute(r)
        self.stats["steps"] += 1
        self.stats["compute_ms"] += (time.perf_counter() - t0) * 1e3
        anon = anon_rss_bytes()
        self.stats["anon_rss_max_bytes"] = max(self.stats["anon_rss_max_bytes"], anon)
        return x

    def close(self) -> None:
        self.stats["anon_rss_end_bytes"] = proc_status_bytes("RssAnon")
        self.stats["file_rss_end_bytes"] = mapped_file_rss_bytes(self.gguf_path)
        self.stats["peak_rss_bytes"] = proc_status_bytes("VmHWM")
        log(self.rank, f"{self.stats['steps']} windows in {self.stats['compute_ms']:.0f} ms; anon RSS "
                       f"max {self.stats['anon_rss_max_bytes'] / 2**20:.1f} MiB, model pages resident "
                       f"{self.stats['file_rss_end_bytes'] / 2**20:.1f} MiB of "
                       f"{self.stats['share_bytes'] / 2**20:.1f} MiB served")
        if self.opts.stats_json:
            Path(self.opts.stats_json).write_text(json.dumps(self.stats, indent=2))
        self.pull.close(linger=0)
        self.push.close(linger=0)
        self.pager.close()


def _spans(windows: list[list[int]]) -> str:
    return " ".join(f"{w[0]}-{w[-1]}" if len(w) > 1 else str(w[0]) for w in windows if w)
