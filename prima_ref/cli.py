"""prima-cli: generate text with a GGUF model, with llama-cli's flags.

    prima-cli -m model.gguf -p "Once upon a time" -n 64
    prima-cli -cnv                      # chat with the default model

As one device of a ring (prima.cpp's flags, or a plan file from prima-plan):

    prima-cli -m model.gguf --plan plan.json --rank 1                 # a worker
    prima-cli -m model.gguf --plan plan.json --rank 0 -p "Hi" -n 32   # rank 0: prompt, sampling
    prima-cli -m m.gguf --world 3 --rank 0 --next 192.168.1.3 -lw "10,10,10" -p "Hi"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from prima_ref import __version__

# Defaults, as llama.cpp's common.h sets them unless noted.
DEFAULTS = dict(
    n_predict=-1,  # until end of generation or a full context
    ctx_size=4096,  # a plan file's ctx wins unless -c is given
    batch_size=512,  # prompt tokens per forward pass
    temp=0.8,
    top_k=40,
    top_p=0.95,
    min_p=0.05,
    repeat_penalty=1.0,  # off, as in current llama.cpp
    repeat_last_n=64,
    seed=-1,  # -1: random
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prima-cli", description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from PyPI)")
    p.add_argument("-p", "--prompt", default=None)
    p.add_argument("-f", "--file", help="read the prompt from a file")
    p.add_argument("-n", "--n-predict", type=int, default=DEFAULTS["n_predict"])
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help=f"0: the model's (default {DEFAULTS['ctx_size']}, or the plan's)")
    p.add_argument("-b", "--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("-t", "--threads", type=int, default=None, help="default: all cores")
    p.add_argument("-s", "--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--temp", type=float, default=DEFAULTS["temp"])
    p.add_argument("--top-k", type=int, default=DEFAULTS["top_k"])
    p.add_argument("--top-p", type=float, default=DEFAULTS["top_p"])
    p.add_argument("--min-p", type=float, default=DEFAULTS["min_p"])
    p.add_argument("--repeat-penalty", type=float, default=DEFAULTS["repeat_penalty"])
    p.add_argument("--repeat-last-n", type=int, default=DEFAULTS["repeat_last_n"])
    p.add_argument("-cnv", "--conversation", action="store_true", help="chat mode; 'quit' or 'exit' leaves")
    p.add_argument("-sys", "--system-prompt", default=None, help="system message in chat mode")
    p.add_argument("--no-display-prompt", action="store_true")
    p.add_argument("--stats-json", help="write timings and peak RSS to this JSON file")
    p.add_argument("--dump-logits", metavar="NPZ", help="save the prompt, tokens and the logits "
                   "before each sampled token (for comparing runs)")
    p.add_argument("--version", action="version", version=_version_string())
    add_repack_flag(p)
    _ring_flags(p.add_argument_group("ring (prima.cpp's distributed flags)"))
    from prima_ref.speculative import add_draft_flags

    add_draft_flags(p)
    return p


def add_repack_flag(p) -> None:
    p.add_argument("-nr", "--no-repack", action="store_true",
                   help="map the GGUF file itself, not the copy with its legacy-quant matrices "
                        "repacked for the decode kernels (prima_ref.repacked; llama.cpp's flag)")


def apply_repack_flag(args) -> None:
    if args.no_repack:  # read by prima_ref.repacked.enabled(), in this process and its children
        os.environ["PRIMA_REF_REPACK"] = "0"


def _ring_flags(g) -> None:
    from prima_ref.ring.topology import DATA_PORT_BASE, SIGNAL_PORT_BASE

    g.add_argument("--plan", help="plan file from prima-plan: hosts, ports and layers of every rank")
    g.add_argument("-w", "--world", "--world-size", type=int, default=1, help="number of devices")
    g.add_argument("-r", "--rank", "--my-rank", type=int, default=0, help="this device's rank (0: head)")
    g.add_argument("-mip", "--master", "--master-ip", default="127.0.0.1", help="rank 0's address")
    g.add_argument("-nip", "--next", "--next-node-ip", default="127.0.0.1", help="the next rank's address")
    g.add_argument("-lw", "--layer-window", "--n-layer-window", help='windows in rank order, rank 0 '
                   'only, e.g. "10,10,10"; k = layers / sum (default: an even split, k=1)')
    g.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", type=int, default=None,
                   help="run the last N layers of each window on the CUDA GPU (default: the plan's "
                   "gpu_layers_per_window, else 0); without CUDA every layer stays on the CPU")
    g.add_argument("--gpu-mem", type=float, default=None, metavar="GiB",
                   help="GPU memory for layers; those beyond it stay on the CPU (default: 90%% of "
                   "the free VRAM)")
    g.add_argument("--data-port", type=int, default=DATA_PORT_BASE, help="base; the port is base + rank")
    g.add_argument("--signal-port", type=int, default=SIGNAL_PORT_BASE, help="base; the port is base + rank")
    g.add_argument("--prefetch", action="store_true", help="madvise(WILLNEED) the next window after each")
    g.add_argument("--force", action="store_true", help="with --prefetch: touch the pages in a thread")
    g.add_argument("--release", nargs="?", const="auto", choices=["auto", "always"], default=None,
                   help="drop a finished window from memory (auto: when this rank's share exceeds "
                   "its free memory)")
    g.add_argument("--curve", nargs="?", const="", default=None, metavar="KEYFILE",
                   help="encrypt and authenticate the ring with CurveZMQ; every rank needs the "
                   "same key file (default ~/.cache/prima-ref/ring-curve.key, made on first use; "
                   "`python -m prima_ref.ring.curve FILE` makes one)")
    g.add_argument("--ring-timeout", type=float, default=60.0, help="seconds the ring may take to form")
    g.add_argument("--heartbeat-timeout", type=float, default=2.0,
                   help="seconds of silence after which a rank counts as dead")


def _version_string() -> str:
    import numba
    import numpy
    import zmq

    return f"prima-ref {__version__} (numba {numba.__version__}, numpy {numpy.__version__}, pyzmq {zmq.__version__})"


def _sampling(args):
    from prima_ref.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
        seed=None if args.seed < 0 else args.seed,
    )


def _model_path(args) -> Path:
    if args.model:
        path = Path(args.model)
        if not path.is_file():
            raise SystemExit(f"prima-cli: model file not found: {path}")
        return path
    from prima_ref import fetch

    return fetch.fetch(fetch.DEFAULT_MODEL)


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def ring_options(args, path: Path):
    """RingOptions for this rank, or None when this device runs the model alone."""
    from prima_ref.ring.topology import (
        Layout,
        RingOptions,
        endpoints_from_flags,
        load_plan,
        model_sha256,
        parse_window_sizes,
        plan_gpu_layers,
    )

    layout, sha = None, None
    if args.plan:
        plan = load_plan(args.plan)
        if args.gpu_layers is None:
            args.gpu_layers = plan_gpu_layers(plan.raw, args.rank)
        if plan.layout.world == 1:
            return None
        ep, layout, sha = plan.endpoints(args.rank), plan.layout, plan.sha256
        if args.ctx_size is None and plan.ctx:
            args.ctx_size = plan.ctx
        if ep.rank == 0 and sha and model_sha256(path) != sha:
            raise SystemExit(f"prima-cli: refusing to run: {path.name} is not the model the plan "
                             f"names (sha256 {sha[:16]}...); copy that file here or re-plan")
    elif args.world > 1:
        ep = endpoints_from_flags(args.rank, args.world, args.master, args.next, args.data_port,
                                  args.signal_port)
        if args.rank == 0:
            layout = Layout.from_window_sizes(_window_sizes(args, path, parse_window_sizes),
                                              _n_layers(path))
    else:
        return None
    ep = _with_curve(ep, args.curve)
    return RingOptions(ep, layout, sha, prefetch=args.prefetch, force=args.force,
                       release=args.release, join_timeout_s=args.ring_timeout,
                       heartbeat_timeout_s=args.heartbeat_timeout, stats_json=args.stats_json,
                       gpu_layers=args.gpu_layers or 0, gpu_mem_gib=args.gpu_mem)


def _with_curve(ep, curve_arg):
    """The ring's CurveZMQ key on the endpoints (--curve), or a warning when a rank binds
    beyond loopback in the clear."""
    import dataclasses

    from prima_ref.ring.curve import CurveKeyError, keys_for
    from prima_ref.ring.topology import RingSetupError

    try:
        keys = keys_for(curve_arg)
    except CurveKeyError as err:
        raise RingSetupError(str(err)) from None
    if keys is None:
        if ep.bind_host != "127.0.0.1":
            print("[ring] warning: this rank listens on every interface without encryption; "
                  "add --curve KEYFILE (the same file on every device)", file=sys.stderr)
        return ep
    return dataclasses.replace(ep, curve=keys)


def _n_layers(path: Path) -> int:
    from prima_ref.gguf_file import GGUFModel
    from prima_ref.model.config import ModelConfig

    with GGUFModel.open(path) as g:
        return ModelConfig.from_gguf(g).n_layer


def _window_sizes(args, path, parse) -> list[int]:
    if args.layer_window:
        sizes = parse(args.layer_window)
        if len(sizes) != args.world:
            raise SystemExit(f'prima-cli: -lw "{args.layer_window}" gives {len(sizes)} windows for '
                             f"--world {args.world}")
        return sizes
    n = _n_layers(path)
    return [n // args.world + (1 if r < n % args.world else 0) for r in range(args.world)]


def _dump_logits(engine, args):
    """on_logits callback and a finisher writing the npz, or (None, no-op) without --dump-logits."""
    if not args.dump_logits:
        return None, lambda ids, out: None
    import numpy as np

    rows = []

    def finish(ids, out):
        np.savez(args.dump_logits, prompt=np.asarray(ids, dtype=np.int64),
                 tokens=np.asarray(out, dtype=np.int64),
                 logits=np.stack(rows) if rows else np.zeros((0, 0), np.float32))
    return (lambda logits: rows.append(np.array(logits, dtype=np.float32))), finish


def run_prompt(engine, args) -> int:
    from prima_ref.sampling import Sampler

    prompt = args.prompt
    if args.file:
        prompt = Path(args.file).read_text(encoding="utf-8")
    if prompt is None:
        prompt = ""
    ids = engine.tokenizer.encode(prompt, add_special=True, parse_special=True)
    if not ids:
        raise SystemExit("prima-cli: the prompt is empty and the model adds no BOS token; give -p")
    if not args.no_display_prompt:
        _emit(prompt)
    on_logits, dump = _dump_logits(engine, args)
    generate = args.speculative.generate if args.speculative else engine.generate
    out, timings = generate(ids, args.n_predict, Sampler(_sampling(args)), on_text=_emit,
                            on_logits=on_logits)
    dump(ids, out)
    _emit("\n")
    return _finish(timings, args)


def run_chat(engine, args) -> int:
    from prima_ref.chat import render_for, template_from_metadata
    from prima_ref.sampling import Sampler

    template = template_from_metadata(engine.gguf.get)
    messages = []
    if args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
    sampler = Sampler(_sampling(args))
    timings = None
    while True:
        try:
            user = input("\n> ")
        except EOFError:
            break
        if user.strip() in ("quit", "exit"):
            break
        messages.append({"role": "user", "content": user})
        text = render_for(engine.tokenizer, template, messages, add_generation_prompt=True)
        ids = engine.tokenizer.encode(text, add_special=True, parse_special=True)
        reply = []
        generate = args.speculative.generate if args.speculative else engine.generate
        out, timings = generate(ids, args.n_predict, sampler,
                                on_text=lambda s: (reply.append(s), _emit(s)))
        messages.append({"role": "assistant", "content": "".join(reply)})
        _emit("\n")
    return _finish(timings, args) if timings else 0


def _finish(timings, args) -> int:
    timings.print()
    if "spec_drafted" in timings.extra:
        x = timings.extra
        print(f"[spec] drafted {x['spec_drafted']}, accepted {x['spec_accepted']} "
              f"({100 * x['spec_acceptance_rate']:.1f} %), {x['spec_steps']} target passes for "
              f"{x['generated_tokens']} tokens; {x['spec_dropped']} drafted tokens dropped as "
              "shorter than --draft-min", file=sys.stderr)
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(timings.as_dict(), indent=2))
    return 0


def _load_draft(engine, args) -> int:
    """Sets args.speculative (a SpeculativeDecoder, or None without -md); an exit code on error."""
    from prima_ref.gguf_file import GGUFFormatError
    from prima_ref.speculative import load_draft

    args.speculative = None
    if args.model_draft and not Path(args.model_draft).is_file():
        print(f"prima-cli: draft model file not found: {args.model_draft}", file=sys.stderr)
        return 1
    try:
        args.speculative = load_draft(args, engine)
    except (GGUFFormatError, ValueError) as err:  # VocabMismatchError is a ValueError
        print(f"prima-cli: cannot use the draft model {args.model_draft}: {err}", file=sys.stderr)
        return 1
    if args.speculative is not None:
        d = args.speculative.draft
        print(f"[load] draft {Path(args.model_draft).name}: {d.model.cfg.n_layer} layers, "
              f"{d.load_ms:.0f} ms; --draft-max {args.speculative.n_max}, --draft-min "
              f"{args.draft_min}, --draft-p-min {args.draft_p_min}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    apply_repack_flag(args)
    if args.plan or args.world > 1:
        # Ranks sharing a host take turns computing; OpenMP threads that spin while idle (the
        # default) steal the cores of the rank whose turn it is: 30x slower decode measured on
        # 2 cores. Must be set before numba starts its OpenMP pool.
        os.environ.setdefault("GOMP_SPINCOUNT", "0")
    from prima_ref.quants import set_num_threads

    if args.threads:
        set_num_threads(args.threads)
    from prima_ref.engine import Engine
    from prima_ref.gguf_file import GGUFFormatError
    from prima_ref.ring.head import RingError
    from prima_ref.ring.topology import RingSetupError

    path = _model_path(args)
    try:
        ring = ring_options(args, path)
    except RingSetupError as err:
        print(f"prima-cli: {err}", file=sys.stderr)
        return 2
    if args.ctx_size is None:
        args.ctx_size = DEFAULTS["ctx_size"]
    if ring is not None and ring.endpoints.rank != 0:
        from prima_ref.ring.worker import serve

        if args.model_draft:
            print(f"[spec] -md ignored on rank {ring.endpoints.rank}: the draft runs on rank 0",
                  file=sys.stderr)
        try:
            return serve(ring, path)
        except KeyboardInterrupt:
            return 130
    try:
        engine = Engine(path, n_ctx=args.ctx_size, n_batch=args.batch_size, ring=ring,
                        gpu_layers=args.gpu_layers or 0, gpu_mem_gib=args.gpu_mem)
    except RingError as err:
        print(f"prima-cli: the ring did not form: {err}", file=sys.stderr)
        return 3
    except (GGUFFormatError, ValueError) as err:
        print(f"prima-cli: cannot load {path}: {err}", file=sys.stderr)
        return 1
    print(f"[load] {path.name}: {engine.model.cfg.arch}, {engine.model.cfg.n_layer} layers, "
          f"ctx {engine.n_ctx}, {engine.load_ms:.0f} ms", file=sys.stderr)
    rc = _load_draft(engine, args)
    if rc:
        engine.close()
        return rc
    try:
        return run_chat(engine, args) if args.conversation else run_prompt(engine, args)
    except RingError as err:
        print(f"\nprima-cli: request failed: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("\nprima-cli: interrupted; stopping every rank", file=sys.stderr)
        return 130
    finally:
        if args.speculative is not None:
            args.speculative.close()
        engine.close()


if __name__ == "__main__":
    raise SystemExit(main())
