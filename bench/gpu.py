"""GPU offload checks and timings in one run (issue 8), for the lent GPU machine.

    python bench/gpu.py --out DIR [--models a.gguf b.gguf] [--n-predict 32] [--skip-kernels]

1. kernels: every GPU product type against the CPU kernels and the float64 product of the
   dequantized weights (normalized squared error), at decode (1 token) and prefill (7 tokens).
2. throughput: matvec of a ~256 MiB weight matrix per type (weight bytes / median kernel time,
   CUDA events), beside the device-to-device copy bandwidth (bytes read + written) and free VRAM.
3. models: greedy tokens with 0, half and all layers on the GPU (must equal the CPU-only run)
   and decode tokens per second of each; a synthetic qwen2 model (made here with gguf) always,
   and each --models file.

Writes DIR/gpu.json and prints a summary table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gguf.constants import GGMLQuantizationType as T  # noqa: E402
from numba import cuda  # noqa: E402

from prima_ref.quants import kernels  # noqa: E402

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K, T.F16, T.F32]
PROMPT = "The capital of France is Paris. The capital of Germany is"


def log(msg: str) -> None:
    print(f"[bench-gpu] {msg}", file=sys.stderr, flush=True)


def nse(y, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.sum((np.asarray(y, np.float64) - ref) ** 2) / np.sum(ref**2))


def rows_for(qtype, rng, n_rows, n_cols):
    sys.path.insert(0, str(REPO / "tests"))
    from test_quants import realistic_rows

    return realistic_rows(qtype, rng, n_rows, n_cols)


def check_kernels() -> list[dict]:
    from prima_ref.gpu.layer import Activation, GpuWeight, workspace

    ws, out = workspace(), []
    rng = np.random.default_rng(8)
    for qtype in TYPES:
        raw = rows_for(qtype, rng, 256, 2048)
        kern = kernels(qtype)
        w64 = kern.dequantize(raw).astype(np.float64)
        gw = GpuWeight("w", int(qtype), raw)
        for n_tok in (1, 7):
            xs = rng.standard_normal((n_tok, 2048)).astype(np.float32)
            ys = gw(Activation(ws, "chk", cuda.to_device(xs)), "chk.y").copy_to_host()
            cpu = kern.matmul(raw, xs)
            row = {"type": qtype.name, "n_tok": n_tok, "x_quantized": kern.x_quantized,
                   "bound": 5e-4 if kern.x_quantized else 1e-6,
                   "nse_vs_f64": nse(ys, xs.astype(np.float64) @ w64.T),
                   "nse_vs_cpu": nse(ys, cpu),
                   "cpu_nse_vs_f64": nse(cpu, xs.astype(np.float64) @ w64.T)}
            row["ok"] = row["nse_vs_f64"] <= row["bound"] and np.isfinite(ys).all()
            out.append(row)
            log(f"check {qtype.name:5s} n_tok={n_tok}: nse {row['nse_vs_f64']:.2e} (bound "
                f"{row['bound']:.0e}), vs CPU {row['nse_vs_cpu']:.2e}")
    return out


def _events_ms(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        a, b = cuda.event(), cuda.event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cuda.event_elapsed_time(a, b))
    return times


def throughput() -> dict:
    from prima_ref.gpu import kernels as K
    from prima_ref.gpu.layer import Activation, GpuWeight, workspace

    ws = workspace()
    free, total = cuda.current_context().get_memory_info()
    n_bytes = 1 << 30
    src = cuda.device_array(n_bytes // 4, np.float32)
    dst = cuda.device_array(n_bytes // 4, np.float32)
    copy_ms = float(np.median(_events_ms(lambda: dst.copy_to_device(src), 20)))
    src = dst = None  # free the copy buffers
    res = {"vram_free_gib": free / 2**30, "vram_total_gib": total / 2**30,
           "copy_gbps": 2 * n_bytes / copy_ms / 1e6, "copy_bytes": n_bytes, "matvec": []}
    rng = np.random.default_rng(9)
    n_cols = 4096
    for qtype in TYPES:
        from prima_ref.quants.layouts import row_bytes

        rb = row_bytes(qtype, n_cols)
        n_rows = (256 << 20) // rb
        # random blocks (not zeros): realistic rows for the first 256, tiled
        raw = np.tile(rows_for(qtype, rng, 256, n_cols), (n_rows // 256, 1))
        gw = GpuWeight("w", int(qtype), raw)
        x = cuda.to_device(rng.standard_normal((1, n_cols)).astype(np.float32))
        act = Activation(ws, "tp", x)
        gw(act, "tp.y")  # compile, quantize x once
        cuda.synchronize()
        ms = float(np.median(_events_ms(lambda gw=gw, act=act: gw(act, "tp.y"), 30)))
        ms_co = None  # the coalesced variant (PRIMA_GPU_PRODUCTS=coalesced), checked first
        if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K):
            ref = gw(act, "tp.y", K.PRODUCTS_BY_ITEM).copy_to_host()
            err = nse(gw(act, "tp.y", K.PRODUCTS).copy_to_host(), ref)
            if err <= 1e-10:
                ms_co = float(np.median(_events_ms(
                    lambda gw=gw, act=act: gw(act, "tp.y", K.PRODUCTS), 30)))
            log(f"coalesced {qtype.name}: nse vs item kernel {err:.1e}")
        ms_q = float(np.median(_events_ms(
            lambda gw=gw, x=x: gw(Activation(ws, "tp", x), "tp.y"), 30)))
        row = {"type": qtype.name, "n_rows": n_rows, "n_cols": n_cols, "weight_bytes": raw.nbytes,
               "product_ms": ms, "with_quantize_ms": ms_q, "gbps": raw.nbytes / ms / 1e6,
               "coalesced_ms": ms_co,
               "coalesced_gbps": raw.nbytes / ms_co / 1e6 if ms_co else None}
        row["of_copy"] = row["gbps"] / res["copy_gbps"]
        res["matvec"].append(row)
        log(f"matvec {qtype.name:5s} {n_rows}x{n_cols}: {ms:.3f} ms, {row['gbps']:.0f} GB/s "
            f"({100 * row['of_copy']:.0f}% of copy)")
        gw = None
    return res


def synthetic_model(dst: Path) -> Path:
    from prima_ref.derived import SyntheticSpec, make_synthetic

    spec = SyntheticSpec(name="synth-gpu", arch="qwen2", seed=11,
                         layer_types=("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q5_1", "F16", "F32"),
                         embd_type="Q8_0", output_type="Q8_0", n_layer=4)
    src = REPO / "tests" / "data" / "models" / "synth-qwen2-kquants.gguf"
    return make_synthetic(dst / "synth-gpu.gguf", spec, src)


def cpu_stages(tr, il: int, x: np.ndarray, positions: np.ndarray) -> dict:
    """Transformer._layer's steps on the CPU, keeping each stage (the names GpuLayer.trace uses)."""
    from prima_ref.model import ops

    cfg, w, st = tr.cfg, tr.layers[il], {}
    n_tok = x.shape[0]
    h = tr._norm(x, w.attn_norm)
    st["h"] = h
    q, k, v = w.wq(h), w.wk(h), w.wv(h)
    if w.bq is not None:
        q, k, v = q + w.bq, k + w.bk, v + w.bv
    st["q0"], st["k0"], st["v0"] = q.copy(), k.copy(), v.copy()
    q = q.reshape(n_tok, cfg.n_head, cfg.head_dim)
    k = k.reshape(n_tok, cfg.n_head_kv, cfg.head_dim)
    v = v.reshape(n_tok, cfg.n_head_kv, cfg.head_dim)
    if cfg.qk_norm:
        q = tr._norm(q.reshape(-1, cfg.head_dim), w.q_norm).reshape(q.shape)
        k = tr._norm(k.reshape(-1, cfg.head_dim), w.k_norm).reshape(k.shape)
    base, scale = cfg.layer_rope(il)
    ops.rope_inplace(q, positions, cfg.n_rot, base, scale, cfg.rope_type)
    ops.rope_inplace(k, positions, cfg.n_rot, base, scale, cfg.rope_type)
    st["q"], st["k"] = q.copy(), k.copy()
    cache = tr.kv[il]
    cache.store(positions, k, v)
    att = np.empty_like(q)
    window = cfg.n_swa if cfg.is_swa(il) else 0
    ops.attention(q, cache.k, cache.v, positions, window, np.float32(cfg.attn_scale),
                  np.float32(cfg.attn_softcap), att)
    st["att"] = att
    out = w.wo(att.reshape(n_tok, -1))
    st["o"] = out
    return st


def trace_layers(path: Path, n_tok: int = 15) -> list[dict]:
    """Per layer and stage: normalized squared error of the GPU layer vs the CPU's."""
    from prima_ref.gguf_file import GGUFModel
    from prima_ref.model.transformer import Transformer

    g = GGUFModel.open(path)
    cpu = Transformer(g, 64)
    gpu = Transformer(g, 64, gpu_layers=cpu.cfg.n_layer)
    rng = np.random.default_rng(1)
    x = cpu.embed(rng.integers(0, cpu.cfg.n_vocab, n_tok))
    pos = np.arange(n_tok)
    rows = []
    for il in range(cpu.cfg.n_layer):
        gl = gpu.gpu[il]
        gl.trace = {}
        y_gpu = gl(x, pos)
        st = cpu_stages(cpu, il, x, pos)
        cpu.kv_remove(0)
        y_cpu = cpu._layer(il, x, pos)
        row = {"layer": il, "out": nse(y_gpu, y_cpu)}
        row.update({k: nse(gl.trace[k], v) for k, v in st.items() if k in gl.trace})
        rows.append(row)
        log(f"trace {path.name} layer {il}: " + " ".join(f"{k}={v:.1e}" for k, v in row.items()
                                                         if k != "layer"))
        x = y_cpu
    # how sensitive the model itself is: the CPU forward with layer 0's output perturbed by the
    # relative size of the GPU's layer-0 difference (int8 rounding flips), CPU vs CPU
    tok0 = rng.integers(0, cpu.cfg.n_vocab, n_tok)
    pos0 = np.arange(n_tok)
    cpu.kv_remove(0)
    x0 = cpu._layer(0, cpu.embed(tok0), pos0)
    rel = max(rows[0]["out"], 1e-12) ** 0.5
    rms = np.sqrt(np.mean(x0.astype(np.float64) ** 2))
    noisy = x0 + (rng.standard_normal(x0.shape) * rel * rms).astype(np.float32)
    outs = []
    for xin in (x0, noisy):
        cpu.kv_remove(0)
        outs.append(cpu.logits(cpu.forward_layers(xin, pos0, 1, cpu.cfg.n_layer)))
    rows.append({"step": "cpu_sensitivity", "perturbation_rel": rel,
                 "logits_nse": nse(outs[1], outs[0])})
    log(f"trace {path.name} {rows[-1]}")
    cpu.kv_remove(0)
    # the whole forward as the engine runs it: prefill, one decode step, forget, prefill again
    tok = rng.integers(0, cpu.cfg.n_vocab, n_tok + 1)
    cpu2 = Transformer(g, 64)
    steps = [("prefill", tok[:n_tok], 0), ("decode", tok[n_tok:], n_tok), ("forget", None, 0),
             ("prefill2", tok[:n_tok], 0)]
    for name, t, start in steps:
        if t is None:
            cpu2.kv_remove(0)
            gpu.kv_remove(0)
            continue
        a, b = cpu2.forward(t, start), gpu.forward(t, start)
        top = np.sort(a[-1])[-2:]
        rows.append({"step": name, "logits_nse": nse(b, a), "argmax_equal":
                     bool(np.argmax(a[-1]) == np.argmax(b[-1])),
                     "cpu_margin": float(top[1] - top[0])})
        log(f"trace {path.name} {rows[-1]}")
    return rows


def forced_check(eng, prompt, base, base_logits, base_margins) -> dict:
    """Feed the CPU run's own tokens (teacher forcing), so every position is compared on the same
    context even after a near-tie flip: where the GPU's top-1 differs, the CPU's top-2 margin
    there; top-5 sets; the logits' normalized squared error against the CPU's."""
    eng.tokens.clear()
    eng.model.kv_remove(0)
    lg = eng.eval(prompt)
    miss, top5_diff, errs = [], 0, []
    for i, want in enumerate(base):
        ref = base_logits[i]
        errs.append(nse(lg, ref))
        if int(np.argmax(lg)) != want:
            miss.append({"pos": i, "cpu_margin": base_margins[i]})
        if set(np.argsort(lg)[-5:].tolist()) != set(np.argsort(ref)[-5:].tolist()):
            top5_diff += 1
        if i + 1 < len(base):
            lg = eng.eval([want])
    return {"positions": len(base), "top1_mismatches": miss,
            "top1_mismatch_max_cpu_margin": max((m["cpu_margin"] for m in miss), default=None),
            "top5_set_differs": top5_diff, "logits_nse_median": float(np.median(errs)),
            "logits_nse_max": float(np.max(errs))}


def run_model(path: Path, n_predict: int, n_ctx: int = 512) -> dict:
    from prima_ref.engine import Engine
    from prima_ref.model.config import ModelConfig
    from prima_ref.sampling import Sampler, SamplingParams

    res = {"model": path.name, "runs": []}
    base, base_margins = None, []
    n_layer = None
    for label in ("cpu", "half", "all"):
        if n_layer is None:
            n_gpu = 0
        else:
            n_gpu = {"cpu": 0, "half": n_layer // 2, "all": n_layer}[label]
        eng = Engine(path, n_ctx=n_ctx, gpu_layers=n_gpu)
        n_layer = ModelConfig.from_gguf(eng.gguf).n_layer
        prompt = eng.tokenizer.encode(PROMPT, add_special=True)
        eng.generate(prompt, 4, Sampler(SamplingParams(temperature=0.0)))  # warm-up: compiles
        eng.tokens.clear()  # forget the warm-up: the next request recomputes every position
        eng.model.kv_remove(0)
        margins, logits = [], []  # top-1 minus top-2 logit before each token: how near a tie

        def on_logits(lg, margins=margins, logits=logits):
            top2 = np.partition(lg, -2)[-2:]
            margins.append(float(top2[1] - top2[0]))
            logits.append(np.array(lg, np.float32))

        toks, tm = eng.generate(prompt, n_predict, Sampler(SamplingParams(temperature=0.0)),
                                on_logits=on_logits)
        run = {"label": label, "gpu_layers": len(eng.model.gpu), "n_layer": n_layer,
               "tokens": toks, "eval_tps": tm.eval_tps, "prompt_tps": tm.prompt_tps,
               "text": eng.tokenizer.decode(toks)}
        if base is None:
            base, base_margins, base_logits = toks, margins, logits
        else:
            run["forced"] = forced_check(eng, prompt, base, base_logits, base_margins)
            log(f"{path.name} {label}: teacher-forced on the CPU's tokens: {run['forced']}")
        run["equal_to_cpu"] = toks == base
        n_same = next((i for i, (a, b) in enumerate(zip(toks, base, strict=False)) if a != b),
                      min(len(toks), len(base)))
        run["first_diff"] = None if toks == base else n_same
        run["margins"] = margins
        if toks != base:
            run["cpu_margin_at_diff"] = base_margins[n_same] if n_same < len(base_margins) else None
            run["own_margin_at_diff"] = margins[n_same] if n_same < len(margins) else None
        res["runs"].append(run)
        log(f"{path.name} {label}: {run['gpu_layers']}/{n_layer} GPU layers, {tm.eval_tps:.1f} "
            f"tok/s decode, equal to CPU: {run['equal_to_cpu']}")
        eng.close()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--models", nargs="*", default=[])
    ap.add_argument("--n-predict", type=int, default=32)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--trace", action="store_true", help="per-layer, per-stage GPU vs CPU errors")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from prima_ref.gpu import cuda_status

    ok, why = cuda_status()
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip() \
        if ok else ""
    res = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": why, "nvidia_smi": smi, "host": platform.node(), "cpus": os.cpu_count(),
           "python": platform.python_version()}
    log(f"device: {why} | {smi}")

    def save():
        (out / "gpu.json").write_text(json.dumps(res, indent=1, default=str))

    t0 = time.time()
    if not args.skip_kernels:
        res["kernels"] = check_kernels()
        save()
    if not args.skip_throughput:
        res["throughput"] = throughput()
        save()
    res["models"] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(m) for m in args.models] + [synthetic_model(Path(tmp))]
        for p in paths:
            try:
                if args.trace:
                    res.setdefault("trace", {})[p.name] = trace_layers(p)
                    save()
                res["models"].append(run_model(p, args.n_predict))
            except Exception as err:  # report and go on to the next model
                import traceback

                traceback.print_exc()
                res["models"].append({"model": p.name, "error": f"{type(err).__name__}: {err}"})
            save()
    res["wall_s"] = time.time() - t0
    save()
    print("\n== summary ==")
    for r in res.get("kernels", []):
        print(f"check {r['type']:5s} n_tok={r['n_tok']}  nse={r['nse_vs_f64']:.2e} "
              f"bound={r['bound']:.0e}"
              f"  vsCPU={r['nse_vs_cpu']:.1e}  {'OK' if r['ok'] else 'FAIL'}")
    tp = res.get("throughput")
    if tp:
        print(f"copy {tp['copy_gbps']:.0f} GB/s, free VRAM {tp['vram_free_gib']:.1f} GiB")
        for r in tp["matvec"]:
            item = f" coalesced {r['coalesced_gbps']:.0f} GB/s" if r["coalesced_gbps"] else ""
            print(f"matvec {r['type']:5s} {r['gbps']:7.0f} GB/s ({100 * r['of_copy']:.0f}% of copy)"
                  f" {r['product_ms']:.3f} ms (+quantize {r['with_quantize_ms']:.3f} ms){item}")
    for m in res["models"]:
        if "error" in m:
            print(f"{m['model']}: ERROR {m['error']}")
            continue
        for r in m["runs"]:
            print(f"{m['model']:40s} {r['label']:4s} gpu={r['gpu_layers']:2d}/{r['n_layer']} "
                  f"{r['eval_tps']:7.1f} tok/s  equal={r['equal_to_cpu']} "
                  f"first_diff={r['first_diff']}"
                  + (f" cpu_margin={r.get('cpu_margin_at_diff')} own={r.get('own_margin_at_diff')}"
                     if r['first_diff'] is not None else ""))
            if "forced" in r:
                f = r["forced"]
                print(f"{'':40s} forced: {len(f['top1_mismatches'])}/{f['positions']} top-1 "
                      f"differ (largest CPU margin there {f['top1_mismatch_max_cpu_margin']}), "
                      f"top-5 set differs at {f['top5_set_differs']}, logits nse median "
                      f"{f['logits_nse_median']:.1e} max {f['logits_nse_max']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
