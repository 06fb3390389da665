"""Quant kernel benchmark: matvec GB/s against this machine's RAM read bandwidth, matmul GFLOP/s.

Writes reports/kernels.md (and prints it). Every type in LAYOUTS whose family module imports
is measured; a family that is missing or fails is listed with the reason, not fatal.

    .venv/bin/python bench/kernels.py                 # full run (a few minutes)
    .venv/bin/python bench/kernels.py --quick         # smoke run: small matrices, few repeats
    .venv/bin/python bench/kernels.py --types Q4_0,Q8_0
"""

from __future__ import annotations

import prima_ref  # noqa: F401  (Numba codegen flags: must come before numba is imported)

# isort: split

import argparse
import datetime
import os
import platform
import sys
import time
from importlib import import_module
from pathlib import Path

import llvmlite
import numba
import numpy as np
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T

from prima_ref import membw
from prima_ref.quants import _FAMILIES, lanes, legacy, set_num_threads, tiled
from prima_ref.quants.layouts import LAYOUTS, n_cols, row_bytes

REPORT = Path(__file__).resolve().parent.parent / "reports" / "kernels.md"

# CLI defaults, each with its reason
BIG_BYTES = 1 << 30  # matvec "big" matrix: 4-32x the L3 of the hosts seen, so weights come from RAM
QUICK_BIG_BYTES = 256 << 20  # --quick: still past L2, fast to build
BIG_N_COLS = 8192  # a 7-13B model's hidden size: rows long enough to amortize per-row work
SQUARE = 4096  # the 4096x4096 matrix the issue asks for (32-64 MB: partly cache resident)
MATMUL_TOKENS = 64  # a prefill batch
MATMUL_ROWS, MATMUL_COLS = 4096, 4096
THREADS = (1, 2)
# kernel/probe pass pairs on the big matrix, in BIG_ROUNDS rounds over all the types: on this
# shared VM the bandwidth one pass gets moves by 2x from second to second, and the host flips
# for seconds at a time between a ~30 and a ~55 GB/s mode (and its compute speed with it), so a
# type measured in one window of a second or two gets whichever moment it fell on; rounds
# spread over the run give every type passes from the same stretch of minutes
BIG_REPEATS, QUICK_BIG_REPEATS = 10, 3  # pairs per round and thread count
BIG_ROUNDS, QUICK_BIG_ROUNDS = 5, 1
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
         "avx512_bf16", "avx512_fp16")

# f16 scale fields at these byte offsets get realistic values in random blocks (tests/test_quants
# uses the same offsets); random f16 bits would give inf/nan/subnormal scales, which are slow.
SCALE_FIELDS = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
                T.IQ1_S: [0]}


# Why a type falls short of the read bandwidth, from its generated assembly; each family's
# author keeps their line current.
NOTES = [
    "Legacy (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) matvec on AVX512-VNNI CPUs, and Q4_K / Q5_K on"
    " those but Zen 5 (prima_ref/quants/lanes.py): 16 weight rows in the 16 lanes of a"
    " vector. Each row's 16"
    " quant bytes are loaded whole and 16 rows x 4 dwords transposed in registers (in-lane"
    " unpacks); Q4_1 / Q5_1 take 4 / 2 blocks a pass (whole quads, their scales come out of"
    " the transposes), Q8_0 / Q4_0 / Q5_0 take 2 and pack their f16 scales in general registers"
    " (16 loads, 4 vmovq); nibbles and Q5's 5th bits move by GFNI / VBMI byte ops; then 8"
    " `vpdpbusd` (512-bit) per block of 16 rows with x's 4 bytes broadcast from memory,"
    " one convert + FMA per 16 rows, no horizontal sums. The group two ahead is prefetched"
    " (into L1 on Zen 5, L2 elsewhere), as the hardware prefetchers follow 16 strided streams"
    " poorly, and each pass's prefetches are spread through it (a K super-block's 36-44 in"
    " one burst held the miss buffers: Q5_K from RAM 20 -> 28 GB/s a core). The same kernel"
    " takes 1-8 tokens (server decode batches) and sums in the prefill tiles' order, so"
    " decode, batched decode and prefill give one token the same bits.",
    "What limits the '<type> row-major' rows here (Zen 5, 2 cores): the access pattern of"
    " row-major weights, not instructions. From L2 they run 40-50 GB/s a core (the 4096x4096"
    " column, partly cache resident, shows the same), but from RAM a core reads 76-91 % of"
    " the probe: a group's 16"
    " rows are 16 strided streams, and with any software prefetch tried (the group 1-4 ahead,"
    " per row, sparser, spread finer, into L1 or L2) such streams stop near 80-88 % even with"
    " no work between the loads (a loads-only copy of the Q8_0 kernel: about 85 %). A plain"
    " read shows it (bench/streams.py, reports/streams.md): 16 interleaved rows with the"
    " lanes' prefetch read 79-86 % of the probe, one linear stream prefetched 8 KB ahead"
    " 97-98 %; with no software prefetch the hardware follows 16 rows at 90-93 % while"
    " nothing else runs, but at 74-91 % once there is work between the loads.",
    "So on CPUs with these kernels the engine maps a copy of the GGUF file with its legacy"
    " product matrices lanes.repack()ed (prima_ref.repacked: the same header and byte"
    " ranges, filled for the layers a device runs, file-backed like the source; -nr /"
    " --no-repack maps the source): each 16-row group's blocks interleaved, so a thread"
    " reads one linear stream prefetched 8 KB ahead. The plain legacy rows (Q8_0, Q4_0, ...)"
    " are the same kernels over those bytes: matvec is lanes.matmul_packed at one token, the"
    " kernel fused decode runs; the 64-token column is the prefill tiles gathering from the"
    " repacked layout (tiled.matmul(..., packed=True)); both bit-equal to the row-major"
    " kernels. The '<type> row-major' rows are the GGUF's own layout.",
    "Q4_K / Q5_K decode on Zen 5 runs k_quants' row dot instead of the lanes"
    " (lanes.K_DECODE_KINDS): measured beside them (1 GiB, best of 6 beside the probe,"
    " 2026-12-04) it read 41.1 / 42.6 GB/s at two threads against the lanes' 33.8 / 35.0"
    " (probe 39-42) and 29.1 / 35.1 at one against 26.4 / 28.1, though 13-26 % slower from"
    " cache; the cost is that a K-quant model's decode no longer has the prefill tiles' bits"
    " there, as Q6_K never had. The legacy kinds keep the lanes, whose bits decode, batched"
    " decode and prefill share; the legacy row dot is no faster from RAM (Q4_0 21 against 30"
    " GB/s at one thread).",
    "Q6_K matvec is the row-at-a-time dot of prima_ref/quants/k_quants.py (its lanes kernel,"
    " measured slower on Zen 4, about 80 stack spills in its loop, was taken out); its software"
    " prefetch (8 KB ahead) goes into L2, not L1: into L1 it read only 13-15 GB/s a core from"
    " DRAM on Zen 4 (44-73 % of the probe at two threads). Q2_K and Q3_K are instruction-bound.",
    "Matmul above 8 tokens on AVX512-VNNI CPUs (prima_ref/quants/tiled.py; PRIMA_TILED=0 turns"
    " it off; the 64-token column): legacy types and"
    " Q4_K/Q5_K/Q6_K gather 16 weight rows' quants into the 16 lanes of a vector, then run"
    " 8-token tiles over every block with the accumulators in registers: one `vpdpbusd` per 4"
    " weights x 16 rows and one convert + FMA per block, no horizontal sums. Up to 8 tokens"
    " (decode batches) lanes.py takes them, bit-equal to these tiles.",
    "Big matrices at 2 threads: on this 2-core VM a second thread competes with everything else"
    " on the machine, and the probe at 2 threads flips between about 40 and 73 GB/s from"
    " window to window within one run (the kernel's best pass is set against the probe's best"
    " pass in the same windows); compare runs only with their probe and load lines.",
    "4096x4096 matrices (9-34 MB) fit partly in the L3 (32 MB on this VM), so they can beat"
    " the DRAM figure; the big matrix is 32x that L3.",
]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --- machine ------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.startswith("model name")), platform.processor() or "unknown")
    flags_line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    flags = set(flags_line.split(":", 1)[-1].split())
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "flags": " ".join(f for f in FLAGS if f in flags) or "(unknown)",
        "llvm_cpu": llvmlite.binding.get_host_cpu_name(),
        "versions": f"python {platform.python_version()}, numba {numba.__version__}, "
        f"numpy {np.__version__}, llvmlite {llvmlite.__version__}",
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "numba_env": f"NUMBA_SLP_VECTORIZE={os.environ.get('NUMBA_SLP_VECTORIZE')} "
        f"NUMBA_LOOP_VECTORIZE={os.environ.get('NUMBA_LOOP_VECTORIZE')}",
    }


def load_avg() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


# --- data ---------------------------------------------------------------------------------------


def available_kernels(types: list[T] | None) -> tuple[dict, dict[str, str]]:
    kernels, skipped = {}, {}
    for family in _FAMILIES:
        try:
            kernels.update(import_module(f"prima_ref.quants.{family}").KERNELS)
        except Exception as e:  # a family another helper is still writing must not stop the run
            skipped[family] = f"{type(e).__name__}: {e}"
    wanted = [t for t in LAYOUTS if t in kernels and (types is None or t in types)]
    return {t: kernels[t] for t in wanted}, skipped


def sample_rows(qtype: T, n_rows: int, n_cols: int, rng) -> np.ndarray:
    """(n_rows, row_bytes) uint8 weights with realistic scales."""
    w = (rng.standard_normal((n_rows, n_cols)) * 0.05).astype(np.float32)
    try:
        return np.ascontiguousarray(gq.quantize(w, qtype).view(np.uint8).reshape(n_rows, -1))
    except NotImplementedError:  # gguf-py quantizes only some types: random blocks below
        pass
    layout = LAYOUTS[qtype]
    raw = rng.integers(0, 256, (n_rows, row_bytes(qtype, n_cols)), dtype=np.uint8)
    blocks = raw.reshape(-1, layout.type_size)
    small = (np.abs(rng.standard_normal(blocks.shape[0])) * 1e-3 + 1e-4).astype(np.float16)
    for off in SCALE_FIELDS.get(qtype, []):
        blocks[:, off : off + 2] = small.view(np.uint8).reshape(-1, 2)
    return raw


def big_matrix(qtype: T, n_bytes: int, n_cols: int, rng) -> np.ndarray:
    """A matrix of about n_bytes, made by tiling a realistic 256-row sample (fast to build)."""
    sample = sample_rows(qtype, 256, n_cols, rng)
    n_rows = max(256, n_bytes // sample.shape[1] // 256 * 256)
    return np.ascontiguousarray(np.tile(sample, (n_rows // 256, 1)))  # (n_rows, row_bytes)


def best_seconds(fn, repeats: int) -> float:
    fn()  # compile and warm
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# --- measurements -------------------------------------------------------------------------------


class Repacked:
    """lanes.matmul_packed, timed over a matrix that run() lanes.repack()ed once beforehand:
    the legacy kinds with each 16-row group's blocks interleaved, as the engine maps them
    (prima_ref.repacked; one token: the rows16_packed kernel its fused decode runs)."""

    x_quantized = True

    def __init__(self, qtype: T):
        self.kind, self.block_bytes = int(qtype), LAYOUTS[qtype].type_size

    def layout(self, raw: np.ndarray) -> np.ndarray:
        return lanes.repack(raw, self.block_bytes)

    def matvec(self, packed: np.ndarray, x: np.ndarray) -> np.ndarray:
        return lanes.matmul_packed(self.kind, packed, x[None, :])[0]

    def matmul(self, packed: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """As the engine's prefill: the tiles over the repacked layout above 8 tokens."""
        if xs.shape[0] > legacy.TILED_MIN_TOKENS and tiled.enabled():
            return tiled.matmul(self.kind, packed, legacy.prepare_activations(xs), packed=True)
        return lanes.matmul_packed(self.kind, packed, xs)


PACKED_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)


# --- measurements -------------------------------------------------------------------------------


def bench_matvec(qtype: T, k, raw: np.ndarray, repeats: int,
                 probe: np.ndarray | None = None) -> dict[int, tuple[float, float | None]]:
    """{threads: (GB/s of weight bytes, GB/s of the RAM probe in the same window)}.

    With a probe buffer the kernel and the probe alternate, pass by pass, at the same thread
    count, and each reports its best pass: on a shared VM the bandwidth available moves by
    tens of percent from minute to minute, so a kernel is only comparable with a probe read in
    the same seconds."""
    x = np.random.default_rng(1).standard_normal(n_cols(qtype, raw.shape[1])).astype(np.float32)
    out = {}
    for threads in THREADS:
        set_num_threads(threads)
        k.matvec(raw, x)  # compile and warm
        if probe is None:
            out[threads] = (raw.nbytes / best_seconds(lambda: k.matvec(raw, x), repeats) / 1e9,
                            None)
            continue
        best_k, probe_gbps = float("inf"), 0.0
        for _ in range(repeats):
            probe_gbps = max(probe_gbps, membw.read_bw_gbps(probe, threads, 1))
            t0 = time.perf_counter()
            k.matvec(raw, x)
            best_k = min(best_k, time.perf_counter() - t0)
        out[threads] = (raw.nbytes / best_k / 1e9, probe_gbps)
    return out


def bench_matmul(qtype: T, k, repeats: int) -> float:
    """GFLOP/s of ys = xs @ W.T at MATMUL_TOKENS tokens, all threads."""
    rng = np.random.default_rng(2)
    raw = getattr(k, "layout", lambda r: r)(sample_rows(qtype, MATMUL_ROWS, MATMUL_COLS, rng))
    xs = rng.standard_normal((MATMUL_TOKENS, MATMUL_COLS)).astype(np.float32)
    set_num_threads(max(THREADS))
    seconds = best_seconds(lambda: k.matmul(raw, xs), repeats)
    return 2 * MATMUL_TOKENS * MATMUL_ROWS * MATMUL_COLS / seconds / 1e9


def sgemm_gflops(repeats: int) -> float:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((MATMUL_ROWS, MATMUL_COLS)).astype(np.float32)
    xs = rng.standard_normal((MATMUL_TOKENS, MATMUL_COLS)).astype(np.float32)
    seconds = best_seconds(lambda: xs @ w.T, repeats)
    return 2 * MATMUL_TOKENS * MATMUL_ROWS * MATMUL_COLS / seconds / 1e9


def run(types: list[T] | None, quick: bool) -> tuple[dict, list[dict], dict, float, dict]:
    repeats = 2 if quick else 5
    big_repeats = QUICK_BIG_REPEATS if quick else BIG_REPEATS
    big_rounds = QUICK_BIG_ROUNDS if quick else BIG_ROUNDS
    big_bytes = QUICK_BIG_BYTES if quick else BIG_BYTES
    log(f"read bandwidth over {big_bytes >> 20} MiB ...")
    bw = membw.measure(big_bytes, THREADS, repeats)
    kernels, skipped = available_kernels(types)
    # (row label, type, kernel); a legacy type's row is the repacked layout the engine maps
    # (prima_ref.repacked) where the lanes kernels run, its GGUF row-major bytes right after
    entries = []
    for qtype, k in kernels.items():
        if qtype in PACKED_TYPES and lanes.available():
            entries.append((qtype.name, qtype, Repacked(qtype)))
            entries.append((f"{qtype.name} row-major", qtype, k))
        else:
            entries.append((qtype.name, qtype, k))
    rows: dict[str, dict] = {}
    probe = membw.make_buffer(big_bytes)  # read between the big-matrix passes
    for rnd in range(big_rounds):
        for label, qtype, k in entries:
            if label in skipped:
                continue
            log(f"{label} (round {rnd + 1} of {big_rounds}) ...")
            rng = np.random.default_rng(int(qtype))  # the same matrices every round
            layout = getattr(k, "layout", lambda raw: raw)
            try:
                big = layout(big_matrix(qtype, big_bytes, BIG_N_COLS, rng))
                got = bench_matvec(qtype, k, big, big_repeats, probe)
                if rnd == 0:
                    square = layout(sample_rows(qtype, SQUARE, SQUARE, rng))
                    rows[label] = {
                        "type": label, "big_mib": big.nbytes >> 20, "big": got,
                        "square": bench_matvec(qtype, k, square, repeats * 4),
                        "matmul": bench_matmul(qtype, k, repeats),
                        "x_quantized": k.x_quantized,
                    }
                else:  # each side's best pass over the rounds
                    was = rows[label]["big"]
                    rows[label]["big"] = {t: (max(was[t][0], got[t][0]), max(was[t][1], got[t][1]))
                                          for t in THREADS}
            except Exception as e:  # report a broken kernel, keep measuring the others
                skipped[label] = f"{type(e).__name__}: {e}"
                rows.pop(label, None)
            finally:
                big = square = None
    probe = None
    sgemm = sgemm_gflops(repeats)
    log("read bandwidth again (the best of both runs is the reference) ...")
    bw_end = membw.measure(big_bytes, THREADS, repeats)
    bw = {key: max(bw[key], bw_end[key]) for key in bw}
    return bw, list(rows.values()), skipped, sgemm, {"load_after": load_avg(), "rounds": big_rounds}


# --- report -------------------------------------------------------------------------------------


def render(info, load_before, bw, rows, skipped, sgemm, extra, quick) -> str:
    ref = {t: bw[str(t)] for t in THREADS}
    lines = [
        "# Quant kernel benchmark", "",
        f"Written by `bench/kernels.py{' --quick' if quick else ''}` on {info['date']}.", "",
        f"- CPU: {info['cpu']} (LLVM: {info['llvm_cpu']}), {info['cores']} cores",
        f"- flags that matter: {info['flags']}",
        f"- {info['versions']}; {info['numba_env']}",
        f"- load average (1/5/15 min) before: {load_before}, after: {extra['load_after']}"
        " (other work on the machine makes every figure below a lower bound)", "",
        "## RAM read bandwidth (prima_ref/membw.py)", "",
        "Streaming read of a buffer of the big matrix's size, best of the runs before and after"
        " the kernels.", "",
        "| threads | GB/s |", "|---|---|",
        *[f"| {t} | {bw[str(t)]:.1f} |" for t in THREADS],
        f"| numpy `a.sum()` (float32, 1 thread) | {bw['numpy_sum']:.1f} |", "",
        *([f"**The probe read less than numpy's own sum at 1 thread ({bw['1']:.1f} vs "
           f"{bw['numpy_sum']:.1f} GB/s), so it is not this machine's read bandwidth here and "
           "the percentages below are against too low a reference; compare the GB/s with the "
           "numpy figure instead.**", ""] if bw["numpy_sum"] > 1.2 * bw["1"] else []),
        "## matvec: GB/s of weight bytes (% of read bandwidth at the same thread count)", "",
        "Big matrix: each kernel pass alternates with a pass of the RAM probe over a buffer of"
        " the same size at the same thread count, in"
        f" {extra['rounds']} round(s) of {BIG_REPEATS if not quick else QUICK_BIG_REPEATS}"
        " pairs spread over the run (every type in each round); the cell gives the kernel's"
        " best pass, then its percentage of the probe's best pass over those same windows (the"
        " probe's GB/s after 'of'). 4096x4096: best of its passes, against the probe table"
        " above.", "",
        "| type | x int8 | big matrix MiB | big 1 thr | big 2 thr | 4096x4096 1 thr "
        "| 4096x4096 2 thr | matmul 64 tok GFLOP/s | vs sgemm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r['big'][t][0]:.1f} ({100 * r['big'][t][0] / r['big'][t][1]:.0f} % of "
                 f"{r['big'][t][1]:.1f})" for t in THREADS]
        cells += [f"{r['square'][t][0]:.1f} ({100 * r['square'][t][0] / ref[t]:.0f} %)"
                  for t in THREADS]
        lines.append(f"| {r['type']} | {'yes' if r['x_quantized'] else 'no'} | {r['big_mib']} | "
                     + " | ".join(cells)
                     + f" | {r['matmul']:.1f} | {100 * r['matmul'] / sgemm:.0f} % |")
    lines += ["", f"numpy float32 sgemm, same shape ({MATMUL_TOKENS}x{MATMUL_COLS} @ "
              f"{MATMUL_COLS}x{MATMUL_ROWS}): {sgemm:.1f} GFLOP/s.", ""]
    lines += ["## What limits the types that fall short", ""] + [f"- {n}" for n in NOTES] + [""]
    if skipped:
        lines += ["## Not measured", ""] + [f"- {k}: {v}" for k, v in skipped.items()] + [""]
    return "\n".join(lines)


def parse_types(text: str | None) -> list[T] | None:
    if not text:
        return None
    try:
        return [T[name.strip().upper()] for name in text.split(",") if name.strip()]
    except KeyError as e:
        known = ", ".join(t.name for t in LAYOUTS)
        raise SystemExit(f"--types: unknown type {e}; known: {known}") from None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small matrices, few repeats (smoke run)")
    ap.add_argument("--types", help="comma-separated subset, e.g. Q4_0,Q8_0")
    ap.add_argument("--out", type=Path, default=REPORT, help="report path")
    args = ap.parse_args(argv)
    info, load_before = machine_info(), load_avg()
    bw, rows, skipped, sgemm, extra = run(parse_types(args.types), args.quick)
    text = render(info, load_before, bw, rows, skipped, sgemm, extra, args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
