"""Shared by the ring tests: free ports, plans, and child processes that never outlive a test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from prima_ref.ring.launch import free_port_base  # noqa: F401  (the tests import it from here)
from prima_ref.ring.topology import Layout, make_plan

PROMPT = ("The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by "
          "the sea, there lived")
GEN_FLAGS = ["-c", "256", "-b", "8", "--temp", "0", "--no-display-prompt", "-t", "1"]
ENV = {**os.environ, "GOMP_SPINCOUNT": "0"}


def write_plan(tmp_path: Path, model, sizes: list[int], *, ctx: int = 256, sha256=None) -> tuple[Path, dict]:
    from prima_ref.cli import _n_layers

    layout = Layout.from_window_sizes(sizes, _n_layers(Path(model)))
    plan = make_plan(model, layout, ctx=ctx, data_port=free_port_base(len(sizes)),
                     signal_port=free_port_base(len(sizes)), sha256=sha256)
    path = tmp_path / f"plan-{'-'.join(map(str, sizes))}.json"
    path.write_text(json.dumps(plan, indent=1))
    return path, plan


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "prima_ref.cli", *map(str, args)]


class Children:
    """Popen'd ranks; every one still running is killed when the block ends, pass or fail."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        out = open(self.log_dir / f"{name}.out", "wb")
        err = open(self.log_dir / f"{name}.err", "wb")
        p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=ENV)
        out.close()
        err.close()
        self.procs[name] = p
        return p

    def out(self, name: str) -> str:
        return (self.log_dir / f"{name}.out").read_text(errors="replace")

    def err(self, name: str) -> str:
        return (self.log_dir / f"{name}.err").read_text(errors="replace")

    def wait_all(self, timeout_s: float) -> dict[str, int | None]:
        deadline = time.monotonic() + timeout_s
        for p in self.procs.values():
            try:
                p.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return {n: p.poll() for n, p in self.procs.items()}

    def wait_for_text(self, name: str, text: str, timeout_s: float, stream: str = "err") -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in (self.err(name) if stream == "err" else self.out(name)):
                return True
            if self.procs[name].poll() is not None:
                return text in (self.err(name) if stream == "err" else self.out(name))
            time.sleep(0.05)
        return False

    def logs(self) -> str:
        return "\n".join(f"--- {n} (rc {p.poll()})\n{self.err(n)[-3000:]}" for n, p in self.procs.items())

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait(10)


def load_dump(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(path)
    return d["tokens"], d["logits"]


# ---------------------------------------------------------------------------------------------
# Memory pressure: a model whose weights dwarf the interpreter, and a cgroup v1 memory limit

# llama, 32 layers of 15.4 MB (Q8_0), separate Q8_0 head: ~490 MB, so under a limit of a few
# hundred MB the weights, not Python's ~80 MB of anonymous memory, decide what fits
BIG_SPEC = dict(name="synth-llama-q8_0-32x1024", arch="llama", seed=7, pre="smollm",
                layer_types=("Q8_0",), embd_type="Q8_0", output_type="Q8_0", n_layer=32,
                n_embd=1024, n_ff=4096, n_head=16, n_head_kv=4, rope_base=10000.0, rms_eps=1e-5)


def big_model() -> Path:
    """The synthetic ~490 MB model, built once with prima_ref.derived into the model cache."""
    from prima_ref import fetch
    from prima_ref.derived import SyntheticSpec, make_synthetic

    path = fetch.cache_dir() / f"{BIG_SPEC['name']}.gguf"
    if not path.exists():
        make_synthetic(path, SyntheticSpec(**BIG_SPEC))
    return path


def cgroup_v1_child(name: str) -> Path | None:
    """A new child of this process's cgroup v1 memory controller, or None where there is none
    or it is not writable (CI containers); remove it with cgroup_remove."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
                if not (base / "memory.limit_in_bytes").exists():
                    return None
                child = base / f"{name}-{os.getpid()}"
                child.mkdir(exist_ok=True)
                (child / "memory.limit_in_bytes").write_text(str(1 << 62))  # writable?
                return child
    except OSError:
        return None
    return None


def cgroup_remove(child: Path) -> None:
    """Remove a cgroup made by cgroup_v1_child once its processes have exited."""
    for _ in range(50):
        try:
            child.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def in_cgroup(child: Path) -> list[str]:
    """Command prefix that moves the command into the cgroup before it starts."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(child)]


def drop_page_cache(path) -> None:
    """Evict a model file's unmapped pages, and its repacked copy's (what the engine maps,
    prima_ref.repacked), so the next reader starts cold and pays for its pages."""
    from prima_ref import repacked

    for file in (path, repacked.copy_path(path)):
        if not os.path.exists(file):
            continue
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
