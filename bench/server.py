"""prima-server under load: 1, 4 and 8 concurrent streaming clients.

    python bench/server.py [--seconds 60] [--threads 2] [--max-tokens 64]

Starts a real prima-server process on loopback (SmolLM2-135M Q4_1, -np 8), then for each
client count runs that many clients for --seconds, in --rounds windows with the levels
taking turns (so the host's drift falls on every level alike): each client sends streaming
/v1/completions requests back to back (a different prompt each time, sampled at the
server's defaults) and times every SSE chunk. Clients start no request after the window;
the ones in flight finish and count. Reports total tok/s (completion tokens from the usage
chunk over the wall time), p50/p95 time to first token, p50/p95 per-token latency (gap
between content chunks), and errors. Writes reports/server.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _common import machine_lines, write_report  # noqa: E402
from ring_helpers import free_port_base  # noqa: E402

TOPICS = ["a lighthouse keeper", "the first train in the valley", "a cat who learned to read",
          "the river that ran backwards", "a baker in a small town", "an old map", "the winter "
          "market", "a robot gardener", "two brothers and a boat", "the library at night"]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class Client(threading.Thread):
    def __init__(self, base: str, idx: int, deadline: float, max_tokens: int):
        super().__init__(daemon=True)
        self.base, self.idx, self.deadline, self.max_tokens = base, idx, deadline, max_tokens
        self.tokens = self.requests = self.errors = 0
        self.ttft_s: list[float] = []
        self.gaps_s: list[float] = []
        self.error_texts: list[str] = []

    def run(self) -> None:
        k = 0
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < self.deadline:
                k += 1
                topic = TOPICS[(self.idx * 7 + k) % len(TOPICS)]
                body = {"prompt": f"Write a short story about {topic}. Once upon a time,",
                        "max_tokens": self.max_tokens, "stream": True,
                        "stream_options": {"include_usage": True}}
                try:
                    self._one(http, body)
                except Exception as err:  # counted, reported
                    self.errors += 1
                    self.error_texts.append(f"{type(err).__name__}: {err}"[:200])

    def _one(self, http: httpx.Client, body: dict) -> None:
        t0 = time.perf_counter()
        last = None
        usage = None
        with http.stream("POST", self.base + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:120]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise RuntimeError(obj["error"]["message"])
                if obj.get("usage"):
                    usage = obj["usage"]
                if obj["choices"] and obj["choices"][0]["text"]:
                    now = time.perf_counter()
                    if last is None:
                        self.ttft_s.append(now - t0)
                    else:
                        self.gaps_s.append(now - last)
                    last = now
        if usage is None:
            raise RuntimeError("stream ended without a usage chunk")
        self.tokens += usage["completion_tokens"]
        self.requests += 1


def run_level(base: str, n_clients: int, seconds: float, max_tokens: int) -> dict:
    before = httpx.get(base + "/health").json()
    t0 = time.monotonic()
    clients = [Client(base, i, t0 + seconds, max_tokens) for i in range(n_clients)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(seconds + 300)
    wall = time.monotonic() - t0
    after = httpx.get(base + "/health").json()
    ttft = [x for c in clients for x in c.ttft_s]
    gaps = [x for c in clients for x in c.gaps_s]
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decode_rows"] - before["decode_rows"]
    res = dict(clients=n_clients, wall_s=wall, requests=sum(c.requests for c in clients),
               tokens=sum(c.tokens for c in clients), errors=sum(c.errors for c in clients),
               error_texts=[t for c in clients for t in c.error_texts][:3],
               ttft_p50_ms=pct(ttft, 50) * 1e3, ttft_p95_ms=pct(ttft, 95) * 1e3,
               tok_p50_ms=pct(gaps, 50) * 1e3, tok_p95_ms=pct(gaps, 95) * 1e3,
               rows_per_step=rows / steps if steps else 0.0, ttft_s=ttft, gaps_s=gaps,
               decode_rows=rows)
    res["decode_steps"] = steps
    for part in ("prompt_s", "decode_s", "sample_s"):  # the scheduler's share of the window
        res[part] = after[part] - before[part]
    res["tok_s"] = res["tokens"] / wall
    print(f"[bench] {n_clients} clients: {res['tok_s']:.1f} tok/s, {res['requests']} requests, "
          f"TTFT p50 {res['ttft_p50_ms']:.0f} ms, per token p50 {res['tok_p50_ms']:.1f} ms, "
          f"{res['rows_per_step']:.2f} rows per decode step, {res['errors']} errors; "
          f"scheduler: prompt {res['prompt_s']:.1f} s, decode {res['decode_s']:.1f} s, "
          f"sampling+text {res['sample_s']:.1f} s of {wall:.1f} s",
          file=sys.stderr)
    return res


def merge(parts: list[dict]) -> dict:
    """One level's rounds as one window: counts and seconds summed, percentiles over every
    request's samples, and each round's tok/s kept (round_tok_s)."""
    res = {"clients": parts[0]["clients"], "round_tok_s": [p["tok_s"] for p in parts]}
    for key in ("wall_s", "requests", "tokens", "errors", "decode_steps", "decode_rows",
                "prompt_s", "decode_s", "sample_s"):
        res[key] = sum(p[key] for p in parts)
    res["error_texts"] = [t for p in parts for t in p["error_texts"]][:3]
    ttft = [x for p in parts for x in p["ttft_s"]]
    gaps = [x for p in parts for x in p["gaps_s"]]
    res.update(ttft_p50_ms=pct(ttft, 50) * 1e3, ttft_p95_ms=pct(ttft, 95) * 1e3,
               tok_p50_ms=pct(gaps, 50) * 1e3, tok_p95_ms=pct(gaps, 95) * 1e3,
               tok_s=res["tokens"] / res["wall_s"],
               rows_per_step=res["decode_rows"] / res["decode_steps"] if res["decode_steps"]
               else 0.0)
    return res


DECODE_COSTS = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from decode_batch import fill_slots, step_times  # bench/decode_batch.py: the same forwards
from prima_ref.engine import Engine
from prima_ref.quants import set_num_threads
from prima_ref.sampling import Sampler, SamplingParams
set_num_threads(1)
e = Engine(sys.argv[1], n_ctx=256, n_batch=64, n_slots=8)
fill_slots(e, 8)
out = {}
for n in (1, 2, 4, 8):
    times = sorted(step_times(e, n, 11, time.process_time, warm=1))
    out[n] = times[len(times) // 2] * 1e3
rows = e.decode(list(range(8)), [42] * 8)
for name in ("sample_full", "sample"):
    draw = getattr(Sampler(SamplingParams(seed=1)), name)
    t0 = time.process_time()
    for _ in range(10):
        for r in rows:
            draw(r)
    out[name] = (time.process_time() - t0) / (10 * len(rows)) * 1e3
print(json.dumps(out))
"""


def decode_costs(model: Path) -> dict:
    """CPU ms (median of 11) of one batched decode forward at 1/2/4/8 rows (1 thread, in a
    fresh process, bench/decode_batch.py's forwards), and of sampling one token: what bounds
    the batching gain, free of the machine's load."""
    bench = str(Path(__file__).resolve().parent)
    r = subprocess.run([sys.executable, "-c", DECODE_COSTS, str(model), bench], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "GOMP_SPINCOUNT": "0"})
    if r.returncode != 0:
        raise SystemExit(f"decode cost run failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def start_server(model: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "prima_ref.server", "-m", str(model), "--port", str(port),
           "-np", str(args.parallel), "-c", str(args.ctx), "-t", str(args.threads)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(args.log, "wb"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"prima-server exited: see {args.log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("prima-server did not become ready in 120 s")


def report(results: list[dict], args, load_start: list[str], load_end: tuple, costs: dict) -> str:
    one = next(r for r in results if r["clients"] == 1)["tok_s"]
    lines = ["# prima-server under concurrent streaming clients", "", *load_start,
             f"- load average at end: {', '.join(f'{x:.2f}' for x in load_end)}",
             f"- server: `prima-server -m SmolLM2-135M-Instruct.Q4_1.gguf -np {args.parallel} "
             f"-c {args.ctx} -t {args.threads}` on 127.0.0.1 (real process, real HTTP)",
             f"- clients: httpx threads in one process, streaming `/v1/completions`, "
             f"max_tokens {args.max_tokens}, the server's default sampling (temp 0.8), a "
             f"different short prompt per request, {args.seconds:.0f} s per level in "
             f"{args.rounds} windows of {args.seconds / args.rounds:.0f} s, the levels taking "
             f"turns ({args.clients}, {args.clients}, ..), so that the host's slow spells "
             "(other tenants of this VM's machine) fall on every level alike; requests in "
             "flight at the end of a window finish and count", "",
             "| clients | total tok/s | vs 1 client | requests | TTFT p50 ms | TTFT p95 ms | "
             "per-token p50 ms | per-token p95 ms | rows per decode step | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['clients']} | {r['tok_s']:.1f} | {r['tok_s'] / one:.2f}x | "
                     f"{r['requests']} | {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | "
                     f"{r['tok_p50_ms']:.1f} | {r['tok_p95_ms']:.1f} | {r['rows_per_step']:.2f} | "
                     f"{r['errors']} |")
    four = next((r for r in results if r["clients"] == 4), None)
    if four:
        ok = four["tok_s"] >= 2 * one
        ones = next(r for r in results if r["clients"] == 1)["round_tok_s"]
        per_round = ", ".join(f"{f / o:.2f}x"
                              for f, o in zip(four["round_tok_s"], ones, strict=True))
        lines += ["", f"Target: aggregate tok/s at 4 clients >= 2x one client's: "
                      f"**{'met' if ok else 'not met'}** ({four['tok_s'] / one:.2f}x over the "
                      f"whole run; window by window: {per_round})."]
    lines += ["", "Where the server's scheduler thread spent each level's wall time (its /health "
              "counters): prompt forwards, decode forwards, and turning logits into text "
              "(sampling, detokenizing, stop strings, handing chunks to the HTTP side, which "
              "includes waiting for the GIL while the event-loop thread sends them: sampling "
              "itself costs the figure under the next table); the rest is waiting for work. "
              "A short prompt that rode in a decode step's free rows (Scheduler._step) "
              "counts as decode time, and its tokens are not in 'rows per decode step'.",
              "",
              "| clients | wall s | prompt s | decode s | decode ms per step | sampling+text s "
              "| other s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        steps = r["decode_steps"]
        other = r["wall_s"] - r["prompt_s"] - r["decode_s"] - r["sample_s"]
        lines.append(f"| {r['clients']} | {r['wall_s']:.1f} | {r['prompt_s']:.1f} | "
                     f"{r['decode_s']:.1f} | {r['decode_s'] / steps * 1e3 if steps else 0:.1f} | "
                     f"{r['sample_s']:.1f} | {other:.1f} |")
    errs = [t for r in results for t in r["error_texts"]]
    if errs:
        lines += ["", "First errors:", *[f"- `{e}`" for e in errs]]
    c1 = costs["1"]
    lines += ["", "## What one batched decode step costs (CPU time, 1 thread, no HTTP)", "",
              "| rows in the step | forward ms | ms per row | rows/s vs 1 row |", "|---|---|---|---|"]
    for n in ("1", "2", "4", "8"):
        lines.append(f"| {n} | {costs[n]:.1f} | {costs[n] / int(n):.1f} | "
                     f"{int(n) * c1 / costs[n]:.2f}x |")
    lines += ["", f"Sampling one token at the default chain: {costs['sample_full']:.2f} ms with "
              f"a full-vocabulary sort (Sampler.sample_full), {costs['sample']:.2f} ms "
              "with the top-k selection that prima-cli and the server use (group maxima, then a partition of the groups that can hold the k best) (Sampler.sample, "
              "the same draws). A step of 2 to 8 rows goes through "
              "the batched decode kernels (prima_ref/quants/batched.py; on 512-bit VNNI CPUs "
              "prima_ref/quants/lanes.py: 16 weight rows in the vector lanes, each weight "
              "block loaded once for every row, each row bit-equal to a one-row step), so "
              "every active slot shares one forward (/health: decode_batched). The forwards "
              "are bench/decode_batch.py's (its wall-time and per-kernel table at 2 threads "
              "is reports/decode_batch.md)."]
    lines += ["", "Per-token latency is the gap between consecutive content chunks of one "
              "stream (one token each, except where a UTF-8 character or a stop-string prefix "
              "is held back). 'Rows per decode step' is how many requests shared each batched "
              "forward (the server's /health counters).", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=3,
                    help="split each level's --seconds into this many windows, levels in turn")
    ap.add_argument("--log", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "prima-bench-server.log"))
    ap.add_argument("--no-write", action="store_true", help="print only; leave reports/ alone")
    args = ap.parse_args()
    from prima_ref import fetch

    model = fetch.fetch(fetch.SMOLLM2_Q4_1)
    load_start = machine_lines()
    port = free_port_base(1)
    proc = start_server(model, port, args)
    base = f"http://127.0.0.1:{port}"
    try:
        run_level(base, 2, 3, 8)  # warm: compiles the 2-row kernels and SSE path
        levels = [int(n) for n in args.clients.split(",")]
        rounds: dict[int, list[dict]] = {n: [] for n in levels}
        for _ in range(args.rounds):  # levels take turns, so a slow spell of the host
            for n in levels:          # falls on all of them alike
                rounds[n].append(run_level(base, n, args.seconds / args.rounds,
                                           args.max_tokens))
        results = [merge(rounds[n]) for n in levels]
    finally:
        proc.terminate()
        proc.wait(30)
    costs = {str(k): v for k, v in decode_costs(model).items()}
    text = report(results, args, load_start, os.getloadavg(), costs)
    print(text)
    if not args.no_write:
        write_report("server.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
