"""prima-cli: generate text with a GGUF model, with llama-cli's flags.

    prima-cli -m model.gguf -p "Once upon a time" -n 64
    prima-cli -cnv                      # chat with the default model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prima_ref import __version__

# Defaults, as llama.cpp's common.h sets them unless noted.
DEFAULTS = dict(
    n_predict=-1,  # until end of generation or a full context
    ctx_size=4096,
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
    p.add_argument("-c", "--ctx-size", type=int, default=DEFAULTS["ctx_size"], help="0: the model's")
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
    p.add_argument("--version", action="version", version=_version_string())
    return p


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
    _, timings = engine.generate(ids, args.n_predict, Sampler(_sampling(args)), on_text=_emit)
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
        out, timings = engine.generate(ids, args.n_predict, sampler,
                                       on_text=lambda s: (reply.append(s), _emit(s)))
        messages.append({"role": "assistant", "content": "".join(reply)})
        _emit("\n")
    return _finish(timings, args) if timings else 0


def _finish(timings, args) -> int:
    timings.print()
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(timings.as_dict(), indent=2))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from prima_ref.quants import set_num_threads

    if args.threads:
        set_num_threads(args.threads)
    from prima_ref.engine import Engine
    from prima_ref.gguf_file import GGUFFormatError

    path = _model_path(args)
    try:
        engine = Engine(path, n_ctx=args.ctx_size, n_batch=args.batch_size)
    except (GGUFFormatError, ValueError) as err:
        print(f"prima-cli: cannot load {path}: {err}", file=sys.stderr)
        return 1
    print(f"[load] {path.name}: {engine.model.cfg.arch}, {engine.model.cfg.n_layer} layers, "
          f"ctx {engine.n_ctx}, {engine.load_ms:.0f} ms", file=sys.stderr)
    return run_chat(engine, args) if args.conversation else run_prompt(engine, args)


if __name__ == "__main__":
    raise SystemExit(main())
