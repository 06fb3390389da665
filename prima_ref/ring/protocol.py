"""Wire format of the ring: multipart ZeroMQ messages, a fixed binary header first.

    header  <4s B B H I I I I I I>  magic "PRR1", version, kind, sender rank, session,
                                   request id, step, sequence number (hop), a, b
    DATA    [header(a=n_tokens, b=n_embd), positions int32 (n_tokens,) [+ slots int32 (n_tokens,)],
             x float32 (n_tokens, n_embd)]   without slot ids every row belongs to slot 0
    DATA_ROWS  as DATA; every rank computes the rows one at a time (bit-equal to 1-token passes)
    KV      [header(a=p0, b=p1) [, slot uint32]]   remove cached positions [p0, p1) of a slot
                                       (default 0; p1 = KV_END: to the end)
    PROBE   [header(a=n_floats), payload float32 (n_floats,)]   travels one round untouched
    control [header, JSON object]      HELLO, CONFIG, READY, HEARTBEAT, ERROR, STOP

Data messages (DATA, KV, PROBE) go round the data ring; control messages from rank 0 go round
the signal ring, and every worker sends its own straight to rank 0's signal port. No pickle:
a header that does not parse, or a payload whose size disagrees with it, is dropped and logged.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass

import numpy as np
import zmq

from prima_ref.ring import curve

MAGIC = b"PRR1"
VERSION = 1
HEADER = struct.Struct("<4sBBHIIIIII")
KV_END = 0xFFFFFFFF
# A rank waiting for the ring's next message checks its socket without sleeping for this long
# before it blocks: a sleeping process on a VM wakes 0.1-1 ms after its message arrives (this
# project's 2026-12-02 VM, bench/ring.py: a 4-rank loopback hop of 3584 floats 0.80 ms with no
# spin, 0.09 ms with it; a 2-rank SmolLM2 ring 15.3 -> 13.2 ms a token). Between checks it
# yields the core, so ranks sharing the cores still take turns. PRIMA_RING_SPIN_MS overrides
# it (0: always block).
DEFAULT_SPIN_MS = 20

DATA, KV, PROBE, DATA_ROWS = 1, 2, 3, 4
HELLO, CONFIG, READY, HEARTBEAT, ERROR, STOP = 10, 11, 12, 13, 14, 15
ACTIVATIONS = (DATA, DATA_ROWS)
DATA_KINDS = (DATA, KV, PROBE, DATA_ROWS)
CONTROL_KINDS = (HELLO, CONFIG, READY, HEARTBEAT, ERROR, STOP)
KIND_NAMES = {DATA: "DATA", DATA_ROWS: "DATA_ROWS", KV: "KV", PROBE: "PROBE", HELLO: "HELLO", CONFIG: "CONFIG",
              READY: "READY", HEARTBEAT: "HEARTBEAT", ERROR: "ERROR", STOP: "STOP"}
MAX_CONTROL_BYTES = 1 << 20  # a CONFIG with every layer id of a 200-layer plan is ~10 KB


class ProtocolError(ValueError):
    """A message that is not well formed; the receiver drops it and logs the reason."""


@dataclass(frozen=True)
class Header:
    kind: int
    sender: int
    session: int
    request: int
    step: int
    seq: int
    a: int = 0
    b: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, self.kind, self.sender, self.session, self.request,
                           self.step, self.seq, self.a, self.b)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.request, self.step, self.seq)

    def __str__(self) -> str:
        return (f"{KIND_NAMES.get(self.kind, self.kind)} from rank {self.sender} "
                f"(session {self.session:08x}, request {self.request}, step {self.step}, seq {self.seq})")


@dataclass(frozen=True)
class Message:
    header: Header
    positions: np.ndarray | None = None  # (n_tokens,) int32
    x: np.ndarray | None = None  # (n_tokens, n_embd) float32
    slots: np.ndarray | None = None  # DATA: (n_tokens,) int32 KV slot of each row, None: all 0
    slot: int = 0  # KV: the slot whose positions are removed
    payload: dict | None = None  # control messages


# -- building ---------------------------------------------------------------------------------

def data_frames(h: Header, positions: np.ndarray, x: np.ndarray, slots: np.ndarray | None = None) -> list:
    """slots None (or all 0) sends the single-sequence frame, as before slots existed."""
    positions = np.ascontiguousarray(positions, dtype=np.int32)
    if slots is not None and np.any(slots):
        positions = np.concatenate([positions, np.asarray(slots, dtype=np.int32)])
    x = np.ascontiguousarray(x, dtype=np.float32)  # (n_tokens, n_embd)
    kind = h.kind if h.kind in ACTIVATIONS else DATA
    return [Header(kind, h.sender, h.session, h.request, h.step, h.seq, x.shape[0], x.shape[1]).pack(),
            positions, x]


def kv_frames(h: Header, slot: int = 0) -> list:
    return [h.pack()] if slot == 0 else [h.pack(), struct.pack("<I", slot)]


def control_frames(h: Header, payload: dict | None = None) -> list[bytes]:
    return [h.pack(), json.dumps(payload or {}, separators=(",", ":")).encode()]


# -- parsing ----------------------------------------------------------------------------------

def parse_header(frame) -> Header:
    raw = frame.buffer if hasattr(frame, "buffer") else frame
    if len(raw) != HEADER.size:
        raise ProtocolError(f"header is {len(raw)} bytes, expected {HEADER.size}")
    magic, version, kind, sender, session, request, step, seq, a, b = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this rank speaks {VERSION}")
    if kind not in KIND_NAMES:
        raise ProtocolError(f"unknown message kind {kind}")
    return Header(kind, sender, session, request, step, seq, a, b)


def parse(frames, *, n_embd: int | None = None, max_tokens: int | None = None) -> Message:
    """frames: a list of zmq.Frame (or bytes). Validates every size before looking inside."""
    if not frames:
        raise ProtocolError("empty message")
    h = parse_header(frames[0])
    if h.kind in ACTIVATIONS:
        return _parse_data(h, frames, n_embd, max_tokens)
    if h.kind == KV:
        if len(frames) not in (1, 2) or (len(frames) == 2 and len(_buf(frames[1])) != 4):
            raise ProtocolError(f"KV command with {len(frames)} frames, expected a header and "
                                "an optional 4-byte slot id")
        if h.b != KV_END and h.b < h.a:
            raise ProtocolError(f"KV range [{h.a}, {h.b}) is empty or reversed")
        slot = struct.unpack("<I", _buf(frames[1]))[0] if len(frames) == 2 else 0
        return Message(h, slot=slot)
    if h.kind == PROBE:
        if len(frames) != 2 or len(_buf(frames[1])) != 4 * h.a:
            raise ProtocolError("PROBE payload size disagrees with its header")
        return Message(h, x=np.frombuffer(_buf(frames[1]), dtype=np.float32))
    if len(frames) != 2 or len(_buf(frames[1])) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"{KIND_NAMES[h.kind]} needs one JSON frame of at most {MAX_CONTROL_BYTES} bytes")
    try:
        payload = json.loads(bytes(_buf(frames[1])))
    except ValueError as err:
        raise ProtocolError(f"{KIND_NAMES[h.kind]} payload is not JSON: {err}") from None
    if not isinstance(payload, dict):
        raise ProtocolError(f"{KIND_NAMES[h.kind]} payload is not a JSON object")
    return Message(h, payload=payload)


def _parse_data(h: Header, frames, n_embd, max_tokens) -> Message:
    if len(frames) != 3:
        raise ProtocolError(f"DATA with {len(frames)} frames, expected 3")
    n_tok, embd = h.a, h.b
    if n_tok < 1 or (max_tokens is not None and n_tok > max_tokens):
        raise ProtocolError(f"DATA for {n_tok} tokens (1..{max_tokens} allowed)")
    if n_embd is not None and embd != n_embd:
        raise ProtocolError(f"DATA of width {embd}, this model's n_embd is {n_embd}")
    pos_buf, x_buf = _buf(frames[1]), _buf(frames[2])
    if len(pos_buf) not in (4 * n_tok, 8 * n_tok) or len(x_buf) != 4 * n_tok * embd:
        raise ProtocolError(f"DATA frames of {len(pos_buf)} and {len(x_buf)} bytes disagree with "
                            f"{n_tok} tokens x {embd}")
    ids = np.frombuffer(pos_buf, dtype=np.int32)
    positions, slots = ids[:n_tok], (ids[n_tok:] if ids.size > n_tok else None)
    x = np.frombuffer(x_buf, dtype=np.float32).reshape(n_tok, embd)
    return Message(h, positions=positions, x=x, slots=slots)


def _buf(frame):
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


# -- sockets ----------------------------------------------------------------------------------

def data_pull(ctx: zmq.Context, addr: str, max_msg_bytes: int) -> zmq.Socket:
    s = ctx.socket(zmq.PULL)
    _common(s, server=True)
    s.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)  # a corrupt or hostile peer cannot make us allocate more
    s.setsockopt(zmq.RCVHWM, 64)
    s.bind(addr)
    return s


def data_push(ctx: zmq.Context, addr: str, send_timeout_ms: int) -> zmq.Socket:
    s = ctx.socket(zmq.PUSH)
    _common(s, server=False)
    s.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer that is not connected
    s.setsockopt(zmq.SNDHWM, 64)
    s.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
    s.connect(addr)
    return s


def control_pull(ctx: zmq.Context, addr: str) -> zmq.Socket:
    s = ctx.socket(zmq.PULL)
    _common(s, server=True)
    s.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_BYTES + HEADER.size + 64)
    s.bind(addr)
    return s


def control_push(ctx: zmq.Context, addr: str) -> zmq.Socket:
    s = ctx.socket(zmq.PUSH)
    _common(s, server=False)
    s.setsockopt(zmq.SNDHWM, 256)  # heartbeats to a vanished peer are dropped, not queued forever
    s.connect(addr)
    return s


def _common(s: zmq.Socket, *, server: bool) -> None:
    curve.secure(s, server=server)  # CurveZMQ when the context was given a key (curve.use)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # ZMTP heartbeats notice dead TCP peers under PUSH/PULL
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    s.setsockopt(zmq.TCP_KEEPALIVE, 1)


def send_nowait(s: zmq.Socket, frames) -> bool:
    """Best-effort send (heartbeats, STOP): False when the peer's queue is full or gone."""
    try:
        s.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        return True
    except zmq.Again:
        return False


def spin_seconds() -> float:
    """How long a rank checks its data socket without sleeping before it blocks in a poll
    (PRIMA_RING_SPIN_MS, milliseconds; 0 turns it off)."""
    raw = os.environ.get("PRIMA_RING_SPIN_MS", str(DEFAULT_SPIN_MS))
    try:
        ms = float(raw)
    except ValueError:
        raise ValueError(f"PRIMA_RING_SPIN_MS must be a number of milliseconds, got {raw!r}"
                         ) from None
    if not 0 <= ms <= 1000:
        raise ValueError(f"PRIMA_RING_SPIN_MS must be within 0..1000, got {ms}")
    return ms / 1e3


def wait_readable(s: zmq.Socket, timeout_ms: int, spin_s: float) -> bool:
    """True when s has a message to read: checked without blocking for up to spin_s
    (yielding the core between checks to any process that wants it), then a blocking poll of
    at most timeout_ms."""
    if spin_s > 0:
        end = time.perf_counter() + spin_s
        while time.perf_counter() < end:
            if s.poll(0):
                return True
            os.sched_yield()
    return bool(s.poll(timeout_ms))
