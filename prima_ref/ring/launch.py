"""prima-launch: start every rank of a plan on this machine, or print what each device runs.

    prima-launch --plan plan.json -m model.gguf -p "Hello" -n 32       # all hosts local: run
    prima-launch -m model.gguf -lw "10,10,10" -c 512 -p "Hello"         # writes a plan first
    prima-launch --plan plan.json -m model.gguf --print                  # commands per device

Flags it does not know go to rank 0 (prompt, sampling, -n, --stats-json ...); -t, --prefetch,
--force and --release go to every rank. Every child is stopped when rank 0 ends, fails or is
interrupted: nothing is left running.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prima_ref.ring.topology import (
    DATA_PORT_BASE,
    LOOPBACK,
    SIGNAL_PORT_BASE,
    Layout,
    RingSetupError,
    load_plan,
    make_plan,
    parse_window_sizes,
)

EXIT_GRACE_S = 8.0  # workers leave on STOP at once, or after rank 0's silence (5 s)


def free_port_base(n: int) -> int:
    """A base port with base..base+n-1 all free on 127.0.0.1 (ring ports are base + rank)."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range on 127.0.0.1")


def cli_command(model, plan_path, rank: int, extra=()) -> list[str]:
    return [sys.executable, "-m", "prima_ref.cli", "-m", str(model), "--plan", str(plan_path),
            "--rank", str(rank), *extra]


class LocalRing:
    """Workers 1..M-1 of a plan as child processes of this one (tests, bench, prima-launch).

    Use as a context manager: on exit every child still running is interrupted, then killed."""

    def __init__(self, model, plan_path, *, worker_args=(), env=None, log_dir=None, ranks=None):
        self.model, self.plan_path = model, plan_path
        self.plan = load_plan(plan_path)
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="prima-ring-"))
        self.env = {**os.environ, "GOMP_SPINCOUNT": "0", **(env or {})}  # see prima_ref/cli.py
        self.procs: dict[int, subprocess.Popen] = {}
        ranks = range(1, self.plan.layout.world) if ranks is None else ranks
        for r in ranks:
            self.start(r, worker_args)

    def start(self, rank: int, args=(), prefix=()) -> subprocess.Popen:
        log = open(self.log_dir / f"rank{rank}.log", "wb")
        p = subprocess.Popen([*prefix, *cli_command(self.model, self.plan_path, rank, args)],
                             stdout=log, stderr=subprocess.STDOUT, env=self.env,
                             stdin=subprocess.DEVNULL)
        log.close()
        self.procs[rank] = p
        return p

    def log(self, rank: int) -> str:
        path = self.log_dir / f"rank{rank}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, timeout_s: float = EXIT_GRACE_S) -> dict[int, int | None]:
        """Exit codes once every child has exited (None for any still running at the deadline)."""
        deadline = time.monotonic() + timeout_s
        for p in self.procs.values():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return {r: p.poll() for r, p in self.procs.items()}

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs.values():
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def __enter__(self) -> LocalRing:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prima-launch", description=__doc__.split("\n")[0])
    p.add_argument("--plan", help="plan file (prima-plan's, or one written from -lw)")
    p.add_argument("-m", "--model", required=True, help="the GGUF file every rank holds")
    p.add_argument("-lw", "--layer-window", help='no plan: windows in rank order, e.g. "10,10,10"')
    p.add_argument("-c", "--ctx-size", type=int, default=4096)
    p.add_argument("--data-port", type=int, default=DATA_PORT_BASE)
    p.add_argument("--signal-port", type=int, default=SIGNAL_PORT_BASE)
    p.add_argument("--write-plan", help="with -lw: where to write the plan (default: a temp file)")
    p.add_argument("--print", action="store_true", help="print each device's command, run nothing")
    return p


SHARED_FLAGS = {"-t": 1, "--threads": 1, "--prefetch": 0, "--force": 0, "--release": 0}


def split_rank0_args(rest: list[str]) -> tuple[list[str], list[str]]:
    """(flags for every rank, flags for rank 0) from the flags prima-launch does not know."""
    shared, i = [], 0
    while i < len(rest):
        n = SHARED_FLAGS.get(rest[i])
        if n is None:
            i += 1
            continue
        shared += rest[i:i + 1 + n]
        i += 1 + n
    return shared, rest


def main(argv=None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    try:
        plan_path = _plan_path(args)
        plan = load_plan(plan_path)
    except RingSetupError as err:
        print(f"prima-launch: {err}", file=sys.stderr)
        return 2
    shared, rank0 = split_rank0_args(rest)
    if args.print or not set(plan.hosts) <= set(LOOPBACK):
        for r in range(plan.layout.world):
            cmd = ["prima-cli", *cli_command(args.model, plan_path, r, shared if r else rank0)[3:]]
            print(f"# {plan.hosts[r]}\n{shlex.join(cmd)}")
        return 0
    with LocalRing(args.model, plan_path, worker_args=shared) as ring:
        print(f"[ring] started ranks 1..{plan.layout.world - 1} (logs in {ring.log_dir})", file=sys.stderr)
        head = subprocess.Popen(cli_command(args.model, plan_path, 0, rank0))
        try:
            rc = head.wait()
        except KeyboardInterrupt:
            head.send_signal(signal.SIGINT)
            rc = head.wait(10)
        codes = ring.wait()
        bad = {r: c for r, c in codes.items() if c not in (0, None)}
        if bad:
            print(f"[ring] worker exit codes: {bad}; see {ring.log_dir}", file=sys.stderr)
    return rc


def _plan_path(args) -> Path:
    if args.plan:
        return Path(args.plan)
    if not args.layer_window:
        raise RingSetupError("give --plan plan.json, or -lw \"a,b,c\" to make one")
    from prima_ref.cli import _n_layers

    layout = Layout.from_window_sizes(parse_window_sizes(args.layer_window), _n_layers(Path(args.model)))
    plan = make_plan(args.model, layout, ctx=args.ctx_size, data_port=args.data_port,
                     signal_port=args.signal_port)
    path = Path(args.write_plan or tempfile.mkstemp(prefix="prima-plan-", suffix=".json")[1])
    path.write_text(json.dumps(plan, indent=1))
    print(f"[ring] plan written to {path} (k={layout.k})", file=sys.stderr)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
