"""`profile-tool --listen` / `--peer`: latency and bandwidth over ZeroMQ on loopback, and a
listener that always goes away by itself."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from profiler import network

TOOL = [sys.executable, "-m", "profiler.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_listener(port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(TOOL + ["--listen", str(port), "--bind", "127.0.0.1", *extra],
                            stderr=subprocess.PIPE, text=True)


def _tcp_round_trip_ms(n: int = 200) -> float:
    """Median round trip of a one-byte echo over a plain loopback TCP socket pair."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    times = []
    try:
        for sock in (client, conn):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            t0 = time.perf_counter()
            client.sendall(b"x")
            conn.sendall(conn.recv(1))
            client.recv(1)
            times.append(time.perf_counter() - t0)
    finally:
        for s in (client, conn, server):
            s.close()
    return sorted(times)[n // 2] * 1e3


def test_peer_probe_measures_latency_and_bandwidth_over_loopback():
    port = free_port()
    listener = start_listener(port, "--listen-timeout", "60")
    try:
        result = network.probe(f"127.0.0.1:{port}", n_embd=576, repeats=3, seconds=0.1)
        rc = listener.wait(timeout=10)  # the probe said bye: one session, then exit
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert rc == 0
    assert result.ping_bytes == 576 * 4  # one decode token's f32 activation
    assert result.bulk_message_bytes == network.PREFILL_TOKENS * 576 * 4
    # a ZeroMQ round trip on loopback costs a few plain-TCP round trips, not milliseconds more
    assert 0 < result.latency_ms.mean < 20 * _tcp_round_trip_ms() + 1.0
    assert 0.05 < result.bandwidth_gbps.mean < 1000


def test_listener_exits_by_itself_when_nobody_comes():
    listener = start_listener(free_port(), "--listen-timeout", "0.5")
    try:
        rc = listener.wait(timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert rc == 0
    assert "without one" in listener.stderr.read()


def test_unreachable_peer_fails_fast_with_a_hint():
    with pytest.raises(network.PeerUnreachable, match="--listen"):
        network.probe(f"127.0.0.1:{free_port()}", repeats=1, connect_timeout_s=0.5)


def test_peer_must_be_host_colon_port():
    with pytest.raises(ValueError, match="HOST:PORT"):
        network.probe("localhost", repeats=1)
