"""The control plane: a background thread per rank that owns the signal sockets.

Rank 0 sends HEARTBEAT (and CONFIG, STOP) to rank 1's signal port; each worker relays them to
the next worker at once, so every worker hears rank 0 even while its main thread computes.
Every worker sends HELLO, READY, HEARTBEAT and ERROR straight to rank 0's signal port (prima.cpp's
master socket), so rank 0 sees each rank's liveness directly and can name a dead one without
asking the broken ring. Any message counts as a heartbeat.
"""

from __future__ import annotations

import queue
import sys
import threading
import time

import zmq

from prima_ref.ring import curve
from prima_ref.ring import protocol as P
from prima_ref.ring.topology import Endpoints

HEARTBEAT_INTERVAL_S = 0.25
HELLO_INTERVAL_S = 0.5
# How often the control thread wakes to send queued messages and heartbeats: at 20 ms an idle
# rank burnt ~9 ms of CPU a second (a loaded 2-core VM), at 100 ms ~5; the 5 s fault budget
# and the 0.25 s beats are far coarser.
POLL_MS = 100


def log(rank: int, text: str) -> None:
    print(f"[ring] rank {rank}: {text}", file=sys.stderr, flush=True)


class _ControlThread(threading.Thread):
    def __init__(self, ctx: zmq.Context, ep: Endpoints, session: int):
        super().__init__(name=f"ring-control-{ep.rank}", daemon=True)
        self.ctx, self.ep, self.session = ctx, ep, session
        self.outbox: queue.Queue = queue.Queue()
        self.done = threading.Event()
        self.failure: BaseException | None = None
        self.keys = ep.curve
        if self.keys is not None:  # before the first socket: every socket of ctx uses curve
            curve.use(ctx, self.keys)
        self.zap = curve.zap_socket(ctx)  # None without curve
        self.monitors: dict = {}  # handshake monitor -> what its socket is, for messages
        self.pull = P.control_pull(ctx, f"tcp://{ep.bind_host}:{ep.signal_ports[ep.rank]}")
        self.watch(self.pull, f"rank {ep.rank}'s signal port", link=False)

    def watch(self, s, label: str, link: bool = True) -> None:
        """Report s's failed handshakes; link: s connects to a ring peer (else it binds, and
        anyone may knock on it)."""
        mon = curve.monitor(s)
        if mon is not None:
            self.monitors[mon] = (label, link)

    def send(self, kind: int, payload: dict | None = None) -> None:
        """Queue a control message for the thread to send (sockets are not thread-safe)."""
        self.outbox.put((kind, payload))

    def header(self, kind: int) -> P.Header:
        return P.Header(kind, self.ep.rank, self.session, 0, 0, 0)

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # noqa: BLE001  (reported to the main thread)
            self.failure = err
        finally:
            self._close()

    def _loop(self) -> None:
        next_beat = 0.0
        while not self.done.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self.beat()
                next_beat = now + self.beat_interval()
            while True:
                try:
                    kind, payload = self.outbox.get_nowait()
                except queue.Empty:
                    break
                self.deliver(kind, payload)
            ready = dict(self.poller().poll(POLL_MS))
            if self.zap is not None and self.zap in ready:
                refused = curve.zap_reply(self.zap, self.keys)
                if refused:
                    self.on_handshake_failure(f"rank {self.ep.rank} {refused}", False)
            for mon, (label, link) in self.monitors.items():
                if mon in ready:
                    failed = curve.handshake_failure(mon)
                    if failed:
                        self.on_handshake_failure(f"{label}: {failed}", link)
            if self.pull in ready:
                frames = self.pull.recv_multipart(copy=False)
                try:
                    msg = P.parse(frames)
                except P.ProtocolError as err:
                    log(self.ep.rank, f"dropped a malformed control message: {err}")
                    continue
                self.on_message(msg, frames)
        self.on_exit()

    def poller(self) -> zmq.Poller:
        if getattr(self, "_poller", None) is None:
            self._poller = zmq.Poller()
            for s in [self.pull, *self.monitors] + ([self.zap] if self.zap is not None else []):
                self._poller.register(s, zmq.POLLIN)
        return self._poller

    def stop(self, timeout_s: float = 2.0) -> None:
        self.done.set()
        if self.is_alive():
            self.join(timeout_s)

    def _close(self) -> None:
        for s in self.sockets():  # a bounded linger lets a last STOP or ERROR reach its peer
            s.close(linger=500 if s.socket_type == zmq.PUSH else 0)
        for s in [*self.monitors] + ([self.zap] if self.zap is not None else []):
            s.close(linger=0)

    # overridden
    def beat(self) -> None: ...
    def beat_interval(self) -> float: return HEARTBEAT_INTERVAL_S
    def deliver(self, kind: int, payload: dict | None) -> None: ...
    def on_message(self, msg: P.Message, frames) -> None: ...
    def on_exit(self) -> None: ...
    def sockets(self) -> list: return [self.pull]

    def on_handshake_failure(self, text: str, link: bool) -> None:
        log(self.ep.rank, text)


class HeadControl(_ControlThread):
    """Rank 0: hears every worker, sends heartbeats and commands round the signal ring."""

    def __init__(self, ctx: zmq.Context, ep: Endpoints, session: int):
        super().__init__(ctx, ep, session)
        self.to_next = P.control_push(ctx, ep.signal_addr(ep.next_rank)) if ep.world > 1 else None
        if self.to_next is not None:
            self.watch(self.to_next, f"rank 0's link to {ep.describe(ep.next_rank)}")
        self.lock = threading.Lock()
        self.last_seen: dict[int, float] = {}  # rank -> monotonic time of its last message
        self.hellos: dict[int, dict] = {}
        self.ready: dict[int, dict] = {}
        self.errors: queue.Queue = queue.Queue()
        self.stop_sent = threading.Event()

    def sockets(self):
        return [self.pull] + ([self.to_next] if self.to_next else [])

    def beat(self) -> None:
        if self.to_next:
            P.send_nowait(self.to_next, P.control_frames(self.header(P.HEARTBEAT)))

    def deliver(self, kind, payload) -> None:
        if self.to_next:
            P.send_nowait(self.to_next, P.control_frames(self.header(kind), payload))
        if kind == P.STOP:
            self.stop_sent.set()

    def on_message(self, msg: P.Message, frames) -> None:
        h = msg.header
        if not 1 <= h.sender < self.ep.world:
            log(0, f"dropped control message from unknown rank {h.sender}")
            return
        if h.kind == P.HELLO:  # before CONFIG a worker does not know the session yet
            with self.lock:
                self.hellos[h.sender] = msg.payload
                self.last_seen[h.sender] = time.monotonic()
            return
        if h.session != self.session:
            log(0, f"dropped {h}: not this ring's session {self.session:08x}")
            return
        with self.lock:
            self.last_seen[h.sender] = time.monotonic()
            if h.kind == P.READY:
                self.ready[h.sender] = msg.payload
        if h.kind == P.ERROR:
            self.errors.put((h.sender, str(msg.payload.get("error", "unknown error"))))

    def on_handshake_failure(self, text: str, link: bool) -> None:
        """While the ring forms, a failed handshake ends it at once (a rank with another key
        would otherwise look like one that never started); later ones are only logged."""
        super().on_handshake_failure(text, link)
        with self.lock:
            forming = len(self.ready) < self.ep.world - 1
        if forming:
            self.errors.put((0, f"{text}. Every rank must be given the same key file with "
                                "--curve (and all or none of them)"))

    def on_exit(self) -> None:
        if self.to_next and not self.stop_sent.is_set():  # rank 0 leaving: tell the ring
            P.send_nowait(self.to_next, P.control_frames(self.header(P.STOP)))

    def silent_ranks(self, timeout_s: float) -> list[tuple[int, float]]:
        """Joined ranks not heard from for more than timeout_s, with their silence in seconds."""
        now = time.monotonic()
        with self.lock:
            return [(r, now - t) for r, t in sorted(self.last_seen.items()) if now - t > timeout_s]


class WorkerControl(_ControlThread):
    """Ranks 1..M-1: relay rank 0's messages to the next worker, report to rank 0."""

    def __init__(self, ctx: zmq.Context, ep: Endpoints, hello: dict):
        super().__init__(ctx, ep, session=0)
        self.hello = hello
        self.to_master = P.control_push(ctx, ep.signal_addr(0))
        self.to_next = P.control_push(ctx, ep.signal_addr(ep.next_rank)) if ep.next_rank != 0 else None
        self.watch(self.to_master, f"rank {ep.rank}'s link to {ep.describe(0)}")
        if self.to_next is not None:
            self.watch(self.to_next, f"rank {ep.rank}'s link to {ep.describe(ep.next_rank)}")
        self.config: queue.Queue = queue.Queue()
        self.stopped = threading.Event()
        self.refusal: str | None = None  # why this rank cannot join (a CurveZMQ key mismatch)
        self.last_master = time.monotonic()

    def sockets(self):
        return [self.pull, self.to_master] + ([self.to_next] if self.to_next else [])

    def beat_interval(self) -> float:
        return HEARTBEAT_INTERVAL_S if self.session else HELLO_INTERVAL_S

    def beat(self) -> None:
        if self.session:
            P.send_nowait(self.to_master, P.control_frames(self.header(P.HEARTBEAT)))
        else:
            P.send_nowait(self.to_master, P.control_frames(self.header(P.HELLO), self.hello))

    def deliver(self, kind, payload) -> None:
        P.send_nowait(self.to_master, P.control_frames(self.header(kind), payload))

    def on_message(self, msg: P.Message, frames) -> None:
        h = msg.header
        if h.sender != 0 or h.kind not in (P.CONFIG, P.HEARTBEAT, P.STOP):
            log(self.ep.rank, f"dropped {h}: workers take only rank 0's CONFIG, HEARTBEAT, STOP")
            return
        if h.kind == P.CONFIG and not self.session:
            self.session = h.session
            self.config.put(msg.payload)
        if h.session != self.session:
            if self.session:  # before CONFIG, rank 0's heartbeats are expected and ignored
                log(self.ep.rank, f"dropped {h}: not this ring's session")
            return
        self.last_master = time.monotonic()
        if self.to_next:
            P.send_nowait(self.to_next, frames)
        if h.kind == P.STOP:
            self.stopped.set()

    def on_handshake_failure(self, text: str, link: bool) -> None:
        """Before CONFIG a failed handshake means this rank cannot join: on its links, rank 0
        or the next rank holds another key; on its own port, the previous rank does (only it
        connects there). Leave, saying why; once the ring runs, only log."""
        if self.session or self.refusal:
            super().on_handshake_failure(text, link)
            return
        self.refusal = f"{text}; give every rank the same key file with --curve"
        log(self.ep.rank, f"refusing to join: {self.refusal}")
        self.stopped.set()

    def master_silent_s(self) -> float:
        return time.monotonic() - self.last_master
