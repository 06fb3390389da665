"""Latency and bandwidth to a peer over ZeroMQ, with messages the size the ring sends.

prima.cpp's profiler does not measure the network and its scheduler treats hops as free. Here
`profile-tool --listen PORT` runs on the next device of the ring and `--peer HOST:PORT` on this
one. Over a DEALER -> ROUTER connection (both TCP, like the ring's PUSH/PULL):

    ping + one decode activation (n_embd f32)   -> pong      latency_ms = round trip / 2
    bulk + one prefill activation (512 x n_embd f32), sent back to back for `seconds`
    sync                                        -> done N    bandwidth_gbps = N bytes / time
    bye                                         -> bye       the listener exits (one session)

The sender's queue is kept at a few messages (SNDHWM), so timing stops when the bytes have
arrived, not when they were queued. The listener also exits after `timeout_s` without a
message, on Ctrl-C or SIGTERM: it never outlives its use by more than that.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from profiler.stats import Stat

PREFILL_TOKENS = 512  # llama.cpp's default micro-batch: the largest message a prefill hop sends
DEFAULT_EMBD = 8192  # a 70B model's activation, when no model gives one
PINGS_PER_SAMPLE = 20


@dataclass(frozen=True)
class NetworkResult:
    peer: str
    latency_ms: Stat  # one way: median round trip / 2 per sample
    bandwidth_gbps: Stat
    ping_bytes: int
    bulk_message_bytes: int


class PeerUnreachable(RuntimeError):
    pass


def listen(port: int, *, bind: str = "0.0.0.0", timeout_s: float = 300.0, keep: bool = False,
           log=print) -> int:
    """Serve probes on tcp://bind:port until a client says bye (or, with keep, until idle)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(f"tcp://{bind}:{port}")
        log(f"listening on tcp://{bind}:{port} (exits after a session, or {timeout_s:g} s "
            f"without one)")
        received, last = 0, time.monotonic()
        while time.monotonic() - last < timeout_s:
            if not sock.poll(200):
                continue
            ident, kind, *payload = sock.recv_multipart(copy=False)
            last = time.monotonic()
            kind = kind.bytes
            if kind == b"ping":
                sock.send_multipart([ident, b"pong"])
            elif kind == b"bulk":
                received += sum(len(p) for p in payload)
            elif kind == b"sync":
                sock.send_multipart([ident, b"done", str(received).encode()])
                received = 0
            elif kind == b"bye":
                sock.send_multipart([ident, b"bye"])
                if not keep:
                    log("session done, exiting")
                    return 0
        log(f"no probe for {timeout_s:g} s, exiting")
        return 0
    finally:
        sock.close()
        ctx.term()


def probe(peer: str, *, n_embd: int = DEFAULT_EMBD, repeats: int = 5, seconds: float = 0.3,
          connect_timeout_s: float = 10.0) -> NetworkResult:
    """Measure latency and bandwidth to a `profile-tool --listen` at HOST:PORT."""
    import zmq

    host, _, port = peer.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--peer {peer!r}: expected HOST:PORT, e.g. 192.168.1.13:9100")
    ping = bytes(n_embd * 4)  # one decode token's f32 activation
    bulk = bytes(PREFILL_TOKENS * n_embd * 4)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 4)
    try:
        sock.connect(f"tcp://{host}:{port}")
        _round_trip(sock, ping, connect_timeout_s, peer)  # also waits for the listener
        latency = Stat(tuple(_latency_sample(sock, ping, peer) for _ in range(repeats)))
        bandwidth = Stat(tuple(_bandwidth_sample(sock, bulk, seconds, peer)
                               for _ in range(repeats)))
        sock.send_multipart([b"bye"])
        _reply(sock, 5.0, peer)
    finally:
        sock.close()
        ctx.term()
    return NetworkResult(peer=peer, latency_ms=latency, bandwidth_gbps=bandwidth,
                         ping_bytes=len(ping), bulk_message_bytes=len(bulk))


def _reply(sock, timeout_s: float, peer: str) -> list[bytes]:
    if not sock.poll(int(timeout_s * 1000)):
        raise PeerUnreachable(f"no answer from {peer} within {timeout_s:.0f} s: is "
                              f"`profile-tool --listen {peer.rpartition(':')[2]}` running there "
                              f"and the port open?")
    return sock.recv_multipart()


def _round_trip(sock, payload: bytes, timeout_s: float, peer: str) -> float:
    t0 = time.perf_counter()
    sock.send_multipart([b"ping", payload])
    _reply(sock, timeout_s, peer)
    return time.perf_counter() - t0


def _latency_sample(sock, payload: bytes, peer: str) -> float:
    rtts = [_round_trip(sock, payload, 5.0, peer) for _ in range(PINGS_PER_SAMPLE)]
    return statistics.median(rtts) / 2 * 1e3


def _bandwidth_sample(sock, payload: bytes, seconds: float, peer: str) -> float:
    sent, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sock.send_multipart([b"bulk", payload], copy=False)
        sent += len(payload)
    sock.send_multipart([b"sync"])
    reply = _reply(sock, 60.0, peer)
    elapsed = time.perf_counter() - t0
    if reply[0] != b"done" or int(reply[1]) != sent:
        raise PeerUnreachable(f"{peer}: received {reply[1:]!r} of {sent} bytes sent")
    return sent / elapsed / 1e9
