"""Read patterns from RAM: one linear stream against 2-16 interleaved row streams.

Writes reports/streams.md (and prints it). The lanes decode kernels (prima_ref/quants/lanes.py)
read a 16-row group of a row-major matrix as 16 strided streams, one block of each row in
turn; over lanes.repack()ed bytes the same kernels read one linear stream. This bench reads a
1 GiB buffer in those patterns with nothing but 8-byte loads (optionally a little integer work
per 64 bytes, as a kernel has) and each software prefetch the kernels use, beside the RAM
probe, to show what the pattern alone costs.

    .venv/bin/python bench/streams.py            # about a minute
"""

from __future__ import annotations

import prima_ref  # noqa: F401  (Numba codegen flags: must come before numba is imported)

# isort: split

import argparse
import datetime
import platform
import time
from pathlib import Path

import llvmlite
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from prima_ref import membw
from prima_ref.quants import lanes

REPORT = Path(__file__).resolve().parent.parent / "reports" / "streams.md"
ROW_BYTES = 8704  # a Q8_0 row of 8192 columns, as the kernel bench's big matrix
BUF_BYTES = 1 << 30
ROUNDS = 6  # passes per variant, each beside a probe pass at the same thread count
THREADS = (1, 2)
WORK = (0, 1)  # rounds of multiply-xorshift per 8 words: 0 = loads only
# (label, rows a group, prefetch: None | ("ahead", bytes) | ("group", groups) | ("row", bytes))
VARIANTS = [
    ("1 stream, hardware prefetch only", 1, None),
    ("1 stream, software prefetch 8 KB ahead", 1, ("ahead", 8192)),
    ("16 rows, hardware prefetch only", 16, None),
    ("16 rows, the group 2 ahead (lanes)", 16, ("group", 2)),
    ("16 rows, each row 1 KB ahead", 16, ("row", 1024)),
    ("2 rows, the group 2 ahead", 2, ("group", 2)),
]


@intrinsic
def _prefetch(typingctx, words, idx):
    """llvm.prefetch of words[idx], read, lanes.PREFETCH_LOCALITY (the kernels' choice)."""

    def codegen(context, b, sig, args):
        arr = context.make_array(sig.args[0])(context, b, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8")
        p = b.bitcast(b.gep(arr.data, [args[1]]), i8p)
        b.call(fn, [p, ir.Constant(i32, 0), ir.Constant(i32, lanes.PREFETCH_LOCALITY),
                    ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(words, idx), codegen


def make_reader(rows: int, mode: int, dist: int, work: int):
    """A parallel reader of (n_rows, rw) uint64 words in groups of `rows` rows, 64 bytes of each
    row in turn; mode 0 no software prefetch, 1 `dist` words ahead of each load, 2 the group
    `dist` groups ahead as one linear stream at the same pace (lanes' _frame), 3 each row
    `dist` words ahead (past the row's end: the next group's same row)."""

    @njit(parallel=True)
    def read(words, n_rows, rw):
        ng = n_rows // rows
        out = np.zeros(ng, np.uint64)
        steps = np.uint64(rw // 8)
        m = np.uint64(0x9E3779B97F4A7C15)
        last = np.uint64(words.shape[0] - 8)
        for g in prange(ng):
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.uint64(0)
            base = np.uint64(g) * np.uint64(rows) * np.uint64(rw)
            for s in range(steps):
                if mode == 2:
                    q = (base + np.uint64(rows) * np.uint64(rw) * np.uint64(dist)
                         + np.uint64(s) * np.uint64(8 * rows))
                    for r in range(rows):
                        _prefetch(words, min(q + np.uint64(8 * r), last))
                for r in range(rows):
                    j = base + np.uint64(r) * np.uint64(rw) + np.uint64(s) * np.uint64(8)
                    if mode == 1:
                        _prefetch(words, min(j + np.uint64(dist), last))
                    elif mode == 3:
                        q = j + np.uint64(dist)
                        if s * np.uint64(8) + np.uint64(dist) >= np.uint64(rw):
                            q += np.uint64(rows - 1) * np.uint64(rw)
                        _prefetch(words, min(q, last))
                    a0 += words[j]
                    a1 += words[j + np.uint64(1)]
                    a2 += words[j + np.uint64(2)]
                    a3 += words[j + np.uint64(3)]
                    a4 += words[j + np.uint64(4)]
                    a5 += words[j + np.uint64(5)]
                    a6 += words[j + np.uint64(6)]
                    a7 += words[j + np.uint64(7)]
                    for _ in range(work):
                        a0 = (a0 * m) ^ (a0 >> np.uint64(29))
                        a1 = (a1 * m) ^ (a1 >> np.uint64(29))
                        a2 = (a2 * m) ^ (a2 >> np.uint64(29))
                        a3 = (a3 * m) ^ (a3 >> np.uint64(29))
                        a4 = (a4 * m) ^ (a4 >> np.uint64(29))
                        a5 = (a5 * m) ^ (a5 >> np.uint64(29))
                        a6 = (a6 * m) ^ (a6 >> np.uint64(29))
                        a7 = (a7 * m) ^ (a7 >> np.uint64(29))
            out[g] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7
        return out

    return read


def reader_for(rows: int, prefetch, work: int):
    if prefetch is None:
        return make_reader(rows, 0, 0, work)
    how, amount = prefetch
    if how == "ahead":
        return make_reader(rows, 1, amount // 8, work)
    if how == "group":
        return make_reader(rows, 2, amount, work)
    return make_reader(rows, 3, amount // 8, work)


def measure(rounds: int) -> tuple[list[dict], dict]:
    rw = ROW_BYTES // 8
    n_rows = BUF_BYTES // ROW_BYTES // 16 * 16
    buf = membw.make_buffer(n_rows * ROW_BYTES)
    words = buf[: n_rows * rw]
    gb = words.nbytes / 1e9
    results, probe = [], {}
    for threads in THREADS:
        numba.set_num_threads(threads)
        for work in WORK:
            readers = [(label, reader_for(rows, pf, work)) for label, rows, pf in VARIANTS]
            for _, read in readers:
                read(words[: 64 * rw], 64, rw)  # compile
            best = {label: float("inf") for label, _ in readers}
            best_probe = float("inf")
            for _ in range(rounds):
                for label, read in readers:
                    t0 = time.perf_counter()
                    read(words, n_rows, rw)
                    best[label] = min(best[label], time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    membw._sum_words(buf, threads)
                    best_probe = min(best_probe, time.perf_counter() - t0)
            probe[(threads, work)] = buf.nbytes / 1e9 / best_probe
            for label, _ in readers:
                results.append({"label": label, "threads": threads, "work": work,
                                "gbps": gb / best[label]})
    return results, probe


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else ""
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("model name")), platform.processor() or "unknown")


def render(results, probe, date, rounds) -> str:
    lines = [
        "# Read patterns from RAM", "",
        f"Written by `bench/streams.py` on {date}.", "",
        f"- CPU: {cpu_name()} (LLVM: {llvmlite.binding.get_host_cpu_name()})",
        f"- python {platform.python_version()}, numba {numba.__version__}, numpy {np.__version__}",
        f"- a {BUF_BYTES >> 20} MiB buffer read as rows of {ROW_BYTES} bytes (a Q8_0 row of 8192"
        " columns), 64 bytes of each row of a group in turn; software prefetch with"
        f" llvm.prefetch locality {lanes.PREFETCH_LOCALITY} (the lanes kernels' on this CPU);"
        " 'work' = rounds of a multiply-xorshift on the 8 accumulators per 64 bytes (0: loads"
        " only; 1: about a kernel's time per byte from L2)",
        f"- best of {rounds} passes each, every pass beside a RAM probe pass at the same thread"
        " count; % of the probe's best pass in the same windows", "",
    ]
    for threads in THREADS:
        for work in WORK:
            ref = probe[(threads, work)]
            lines += [f"## {threads} thread(s), work {work} (probe {ref:.1f} GB/s)", "",
                      "| pattern | GB/s | % of probe |", "|---|---|---|"]
            for r in results:
                if r["threads"] == threads and r["work"] == work:
                    pct = 100 * r["gbps"] / ref
                    lines.append(f"| {r['label']} | {r['gbps']:.1f} | {pct:.0f} % |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--out", type=Path, default=REPORT, help="report path")
    args = ap.parse_args(argv)
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    results, probe = measure(args.rounds)
    text = render(results, probe, date, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
