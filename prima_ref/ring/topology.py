"""Who holds which layers, and where every rank listens: from a plan file or prima.cpp's flags.

A plan file (schema "prima-ref/plan", written by prima-plan) names every rank's host, ports and
layer windows. Without one, rank 0 takes `-lw "a,b,c"` (windows in rank order) and every rank
takes `--world --rank --master --next --data-port --signal-port`, as in prima.cpp; rank 0 then
sends the layout to the workers when the ring forms.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prima_ref.ring.curve import CurveKeys

PLAN_SCHEMA = "prima-ref/plan"
DATA_PORT_BASE = 9000  # prima.cpp's --data-port
SIGNAL_PORT_BASE = 10000  # prima.cpp's --signal-port
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RingSetupError(ValueError):
    """A plan, flag or model that cannot form a ring; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Layout: layer windows per rank and round


@dataclass(frozen=True)
class Layout:
    windows: tuple[tuple[tuple[int, ...], ...], ...]  # [rank][round] -> layer ids, consecutive
    k: int
    n_layers: int

    @property
    def world(self) -> int:
        return len(self.windows)

    def layers_of(self, rank: int) -> list[int]:
        return [il for window in self.windows[rank] for il in window]

    def as_json(self) -> dict:
        return {"k": self.k, "n_layers": self.n_layers,
                "windows": [[list(w) for w in rounds] for rounds in self.windows]}

    @classmethod
    def from_json(cls, d: dict) -> Layout:
        windows = tuple(tuple(tuple(int(x) for x in w) for w in rounds) for rounds in d["windows"])
        return cls.checked(windows, int(d["k"]), int(d["n_layers"]))

    @classmethod
    def checked(cls, windows, k: int, n_layers: int) -> Layout:
        if k < 1 or any(len(rounds) != k for rounds in windows):
            raise RingSetupError(f"every rank needs exactly k={k} windows (one per round)")
        if sorted(il for rounds in windows for w in rounds for il in w) != list(range(n_layers)):
            raise RingSetupError(f"the windows do not cover layers 0..{n_layers - 1} exactly once")
        order = list(range(1, len(windows))) + [0]  # ring order within a round
        flat = [il for r in range(k) for rank in order for il in windows[rank][r]]
        if flat != list(range(n_layers)):
            raise RingSetupError("the windows are not in ring order (rank 1, 2, ..., M-1, then 0, "
                                 "round after round)")
        return cls(tuple(tuple(tuple(w) for w in rounds) for rounds in windows), k, n_layers)

    @classmethod
    def from_window_sizes(cls, sizes: list[int], n_layers: int) -> Layout:
        """prima.cpp's -lw: window sizes in rank order; k = n_layers / sum(sizes)."""
        if not sizes or any(s < 0 for s in sizes) or any(s == 0 for s in sizes[1:]):
            raise RingSetupError(f"-lw {sizes}: every worker needs a window of at least 1 layer "
                                 "(rank 0 may have 0)")
        W = sum(sizes)
        if W == 0 or n_layers % W:
            raise RingSetupError(f"-lw {','.join(map(str, sizes))} sums to {W}, which does not "
                                 f"divide the model's {n_layers} layers; k = layers / sum must be whole")
        k = n_layers // W
        order = list(range(1, len(sizes))) + [0]
        windows: list[list[tuple[int, ...]]] = [[] for _ in sizes]
        start = 0
        for _ in range(k):
            for rank in order:
                windows[rank].append(tuple(range(start, start + sizes[rank])))
                start += sizes[rank]
        return cls.checked(windows, k, n_layers)


def parse_window_sizes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise RingSetupError(f'-lw "{text}": expected comma-separated integers such as "10,10,10"') from None


# ---------------------------------------------------------------------------------------------
# Endpoints: where this rank listens and whom it talks to


@dataclass(frozen=True)
class Endpoints:
    """This rank's place in the ring. hosts[r] is None where this rank does not know it
    (prima.cpp's flags tell a rank only the master's and the next rank's address)."""

    rank: int
    hosts: tuple[str | None, ...]
    data_ports: tuple[int, ...]  # PULL for activations and KV commands, per rank
    signal_ports: tuple[int, ...]  # PULL for control (join, config, heartbeats, stop), per rank
    curve: CurveKeys | None = field(default=None, compare=False)  # --curve: the ring's key

    @property
    def world(self) -> int:
        return len(self.hosts)

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.world

    def data_addr(self, rank: int) -> str:
        return f"tcp://{_zmq_host(self.hosts[rank])}:{self.data_ports[rank]}"

    def signal_addr(self, rank: int) -> str:
        return f"tcp://{_zmq_host(self.hosts[rank])}:{self.signal_ports[rank]}"

    @property
    def bind_host(self) -> str:
        """Loopback unless a peer lives elsewhere (then every interface, as prima.cpp binds)."""
        return "127.0.0.1" if {h for h in self.hosts if h} <= set(LOOPBACK) else "*"

    def describe(self, rank: int) -> str:
        host = self.hosts[rank] or "its host"
        return (f"rank {rank} at {host} (data port {self.data_ports[rank]}, "
                f"signal port {self.signal_ports[rank]})")


def _zmq_host(host: str | None) -> str:
    if host is None:
        raise RingSetupError("this rank does not know that peer's host")
    return "127.0.0.1" if host == "localhost" else host


def endpoints_from_flags(rank: int, world: int, master: str, next_host: str, data_port: int,
                         signal_port: int) -> Endpoints:
    if world < 1 or not 0 <= rank < world:
        raise RingSetupError(f"--rank {rank} is outside 0..{world - 1} for --world {world}")
    hosts: list[str | None] = [None] * world
    hosts[(rank + 1) % world] = next_host
    hosts[0] = master if rank != world - 1 else next_host  # the last rank's next is the master
    return Endpoints(rank, tuple(hosts), tuple(data_port + r for r in range(world)),
                     tuple(signal_port + r for r in range(world)))


# ---------------------------------------------------------------------------------------------
# Plan files


@dataclass(frozen=True)
class Plan:
    path: Path
    layout: Layout
    hosts: tuple[str, ...]
    data_ports: tuple[int, ...]
    signal_ports: tuple[int, ...]
    sha256: str | None
    model_file: str | None
    ctx: int | None
    raw: dict

    def endpoints(self, rank: int) -> Endpoints:
        if not 0 <= rank < len(self.hosts):
            raise RingSetupError(f"--rank {rank}: the plan {self.path} has ranks 0..{len(self.hosts) - 1}")
        return Endpoints(rank, self.hosts, self.data_ports, self.signal_ports)


def load_plan(path) -> Plan:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RingSetupError(f"cannot read plan {path}: {err}") from None
    if not isinstance(raw, dict) or raw.get("schema") != PLAN_SCHEMA:
        raise RingSetupError(f"{path} is not a prima-ref plan (schema {PLAN_SCHEMA!r}); make one "
                             "with prima-plan or prima-launch --lw")
    try:
        ranks = sorted(raw["ranks"], key=lambda r: r["rank"])
        if [r["rank"] for r in ranks] != list(range(len(ranks))):
            raise RingSetupError(f"{path}: ranks are not numbered 0..{len(ranks) - 1}")
        layout = Layout.checked([[tuple(w) for w in r["layers"]] for r in ranks], int(raw["k"]),
                                int(raw["model"]["n_layers"]))
        model = raw["model"]
        ctx = raw.get("ctx")
        return Plan(path, layout, tuple(str(r["host"]) for r in ranks),
                    tuple(int(r.get("data_port", DATA_PORT_BASE + r["rank"])) for r in ranks),
                    tuple(int(r.get("signal_port", SIGNAL_PORT_BASE + r["rank"])) for r in ranks),
                    model.get("sha256"), model.get("file"), int(ctx) if ctx else None, raw)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, RingSetupError):
            raise
        raise RingSetupError(f"{path}: malformed plan ({type(err).__name__}: {err})") from None


def plan_gpu_layers(raw: dict, rank: int) -> int:
    """A plan's GPU layers per window for a rank (prima-plan's n_m): gpu_layers_per_window, else
    the longest of its per-window gpu_layers lists; 0 when the plan names none."""
    try:
        r = next(r for r in raw["ranks"] if int(r["rank"]) == rank)
    except (KeyError, StopIteration, TypeError, ValueError):
        return 0
    n = int(r.get("gpu_layers_per_window") or 0)
    lists = r.get("gpu_layers") or []
    return max([n] + [len(w) for w in lists if isinstance(w, list)])


def make_plan(model_path, layout: Layout, *, ctx: int, hosts: list[str] | None = None,
              data_port: int = DATA_PORT_BASE, signal_port: int = SIGNAL_PORT_BASE,
              sha256: str | None = None) -> dict:
    """A minimal plan for a hand-picked layout (what prima-launch --lw and the tests write)."""
    hosts = hosts or ["127.0.0.1"] * layout.world
    ranks = [{"rank": r, "device": f"rank{r}", "host": hosts[r], "data_port": data_port + r,
              "signal_port": signal_port + r, "window": len(layout.windows[r][0]),
              "n_layers": len(layout.layers_of(r)),
              "layers": [list(w) for w in layout.windows[r]],
              "gpu_layers": [[] for _ in layout.windows[r]], "gpu_layers_per_window": 0}
             for r in range(layout.world)]
    return {"schema": PLAN_SCHEMA, "schema_version": 1, "created_by": "prima-launch",
            "model": {"file": Path(model_path).name, "n_layers": layout.n_layers,
                      "sha256": sha256 or model_sha256(model_path)},
            "ctx": ctx, "k": layout.k, "layers_per_round": sum(len(w[0]) for w in layout.windows),
            "ranks": ranks, "removed": []}


# ---------------------------------------------------------------------------------------------
# Model identity


def model_sha256(path) -> str:
    """SHA-256 of a model file, cached by (path, size, mtime) so a restart does not re-read
    tens of GB (and does not fill the page cache with layers this rank never serves)."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = _sha_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), str):
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        try:  # hashing read every page; do not keep them cached on this rank's account
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):
            pass
    cache = cache if isinstance(cache, dict) else {}
    cache[key] = digest.hexdigest()
    tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, cache_path)
    except OSError:
        pass
    return cache[key]


def _sha_cache_path() -> Path:
    root = Path(os.environ.get("PRIMA_REF_CACHE") or Path.home() / ".cache" / "prima-ref")
    root.mkdir(parents=True, exist_ok=True)
    return root / "sha256.json"


# ---------------------------------------------------------------------------------------------
# Run-time options shared by every rank


@dataclass(frozen=True)
class RingOptions:
    endpoints: Endpoints
    layout: Layout | None = None  # rank 0 always; workers when a plan gave it (checked vs CONFIG)
    sha256: str | None = None  # the model the plan names
    prefetch: bool = False  # madvise(WILLNEED) the next window after each window
    force: bool = False  # touch the next window's pages in a background thread
    release: str | None = None  # "auto": DONTNEED a finished window when the share exceeds free memory
    join_timeout_s: float = 60.0  # how long the ring may take to form
    heartbeat_timeout_s: float = 2.0  # a rank silent this long is dead (rank 0 must tell within 5 s)
    master_timeout_s: float = 5.0  # a worker leaves when rank 0 is silent this long
    reply_timeout_s: float = 120.0  # watchdog: a live ring that returns nothing for this long
    stats_json: str | None = None  # workers: write memory and timing numbers here at exit
    gpu_layers: int = 0  # the last n layers of each of this rank's windows run on its GPU
    gpu_mem_gib: float | None = None  # GPU memory cap for those layers (None: 90% of free VRAM)
