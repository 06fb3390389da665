"""prima-server: an OpenAI-compatible HTTP API on rank 0 (llama-server's role in prima.cpp).

    prima-server -m model.gguf --port 8080                      # one device
    prima-server -m model.gguf -np 4 -c 4096                    # 4 requests at once, 1024 each
    prima-server -m model.gguf --plan plan.json --rank 0        # rank 0 of a ring; the other
                                                                # ranks run prima-cli --rank N
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health
(503 while loading or forming the ring), POST /v1/cancel {"task_id": N} (N: the X-Task-Id
response header).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import threading
from pathlib import Path

from prima_ref.cli import (
    DEFAULTS,
    _model_path,
    _ring_flags,
    _sampling,
    add_repack_flag,
    apply_repack_flag,
    ring_options,
)
from prima_ref.server.scheduler import log
from prima_ref.speculative import add_draft_flags, load_draft

LOOPBACK_NAMES = ("localhost",)
MAX_BODY_BYTES = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prima-server", description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from PyPI)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=os.environ.get("PRIMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $PRIMA_API_KEY)")
    p.add_argument("-np", "--parallel", type=int, default=1,
                   help="requests in flight at once; their decode steps share one forward")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help=f"context of all slots together, split evenly (default "
                        f"{DEFAULTS['ctx_size']}, or the plan's; 0: the model's)")
    p.add_argument("-b", "--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("-t", "--threads", type=int, default=None, help="default: all cores")
    p.add_argument("--alias", help="model id in the API (default: the file name without .gguf)")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot")
    p.add_argument("--decode-batching", choices=["auto", "always"], default="auto",
                   help="auto: time 1..N-row decode forwards at startup and step rows one by one "
                        "where that is cheaper; always: every decode step is one batch")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="allow browser pages from this origin (repeatable; no wildcard)")
    g = p.add_argument_group("sampling defaults (a request's own fields win)")
    g.add_argument("-s", "--seed", type=int, default=DEFAULTS["seed"])
    g.add_argument("--temp", type=float, default=DEFAULTS["temp"])
    g.add_argument("--top-k", type=int, default=DEFAULTS["top_k"])
    g.add_argument("--top-p", type=float, default=DEFAULTS["top_p"])
    g.add_argument("--min-p", type=float, default=DEFAULTS["min_p"])
    g.add_argument("--repeat-penalty", type=float, default=DEFAULTS["repeat_penalty"])
    g.add_argument("--repeat-last-n", type=int, default=DEFAULTS["repeat_last_n"])
    p.add_argument("--stats-json", help=argparse.SUPPRESS)  # ring_options reads it
    add_repack_flag(p)
    _ring_flags(p.add_argument_group("ring (prima.cpp's distributed flags; this is rank 0)"))
    add_draft_flags(p)
    return p


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_args(p: argparse.ArgumentParser, args) -> None:
    if args.parallel < 1 or args.parallel > args.batch_size:
        p.error(f"-np must be in 1..{args.batch_size} (the batch size)")
    if "*" in args.cors_origin:
        p.error("--cors-origin '*' is refused: name the origins that may call this server")
    if args.rank != 0:
        p.error("prima-server runs on rank 0; start the other ranks with prima-cli --rank N")
    if args.max_body_bytes < 1024:
        p.error("--max-body-bytes must be at least 1024")
    if args.model_draft and args.parallel != 1:
        p.error("-md drafts for one sequence at a time: use -np 1 with a draft model")
    if args.model_draft and not Path(args.model_draft).is_file():
        p.error(f"draft model file not found: {args.model_draft}")


def _load(state, args, path: Path, ring, on_fail) -> None:
    """Runs in a thread while the HTTP server already answers /health with 503."""
    from prima_ref.chat import template_from_metadata
    from prima_ref.engine import Engine
    from prima_ref.server.scheduler import Scheduler

    try:
        if ring is not None:
            state.status = "forming the ring"
        total = args.ctx_size
        if total == 0:
            from prima_ref.gguf_file import GGUFModel
            from prima_ref.model.config import ModelConfig

            with GGUFModel.open(path) as g:
                total = ModelConfig.from_gguf(g).n_ctx_train
        n_ctx = total // args.parallel
        if n_ctx < 8:
            raise ValueError(f"-c {total} split over -np {args.parallel} leaves {n_ctx} positions a slot")
        engine = Engine(path, n_ctx=n_ctx, n_batch=args.batch_size, ring=ring, n_slots=args.parallel,
                        gpu_layers=args.gpu_layers or 0, gpu_mem_gib=args.gpu_mem)
        state.template = template_from_metadata(engine.gguf.get)
        state.engine = engine
        if args.parallel > 1 and args.decode_batching == "auto":
            state.status = "timing decode batches"
        spec = load_draft(args, engine)  # None without -md
        if spec is not None:
            log(f"draft {Path(args.model_draft).name}: {spec.draft.model.cfg.n_layer} layers; "
                f"--draft-max {spec.n_max}, --draft-min {args.draft_min}, --draft-p-min "
                f"{args.draft_p_min}")
        state.scheduler = Scheduler(engine, max_queue=args.max_queue,
                                    calibrate=args.decode_batching == "auto", spec=spec)
        state.status = "ok"
        log(f"{path.name}: {engine.model.cfg.arch}, {engine.model.cfg.n_layer} layers, "
            f"{args.parallel} slot(s) of {n_ctx} positions, loaded in {engine.load_ms:.0f} ms; ready")
    except Exception as err:  # RingError, GGUFFormatError, ValueError...
        state.status = f"failed to load: {err}"
        log(f"cannot serve {path.name}: {type(err).__name__}: {err}")
        on_fail()


def _server_class():
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGINT/SIGTERM after its shutdown, which would kill this process
        before the ring is told to stop; here a signal only ends the serving loop."""

        @contextlib.contextmanager
        def capture_signals(self):
            sigs = (signal.SIGINT, signal.SIGTERM)
            old = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    apply_repack_flag(args)
    # How long idle OpenMP threads spin before they sleep. Spinning without end steals the
    # cores the HTTP thread needs; not spinning at all makes each of a forward's ~150 parallel
    # regions wake its threads through the kernel. Measured on 2 cores, SmolLM2 Q4_1, 1/4/8
    # streaming clients: 0 gives 34/49/- tok/s, 30000 gives 98/102/147, 300000 106/98/142.
    # Must be set before numba starts its OpenMP pool.
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")
    from prima_ref.quants import set_num_threads

    if args.threads:
        set_num_threads(args.threads)
    import uvicorn

    _Server = _server_class()
    from prima_ref.ring.topology import RingSetupError
    from prima_ref.sampling import SamplingParams
    from prima_ref.server.api import Settings, State, build_app

    path = _model_path(args)
    try:
        ring = ring_options(args, path)
        defaults = _sampling(args)
    except (RingSetupError, ValueError) as err:
        print(f"prima-server: {err}", file=sys.stderr)
        return 2
    assert isinstance(defaults, SamplingParams)
    if args.ctx_size is None:
        args.ctx_size = DEFAULTS["ctx_size"]
    if not is_loopback(args.host) and not args.api_key:
        log(f"WARNING: listening on {args.host} without --api-key: anyone who can reach this "
            "port can use the model")
    model_id = args.alias or (path.name[:-5] if path.name.endswith(".gguf") else path.name)
    state = State(Settings(model_id, args.api_key, args.max_body_bytes, defaults))
    app = build_app(state, args.cors_origin)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=3,
                            timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024)
    server = _Server(config)
    failed = threading.Event()

    def on_fail():
        failed.set()
        server.should_exit = True

    loader = threading.Thread(target=_load, args=(state, args, path, ring, on_fail), daemon=True)
    log(f"listening on http://{args.host}:{args.port} (model '{model_id}'"
        f"{', API key required' if args.api_key else ''}); loading")
    loader.start()
    try:
        server.run()
    finally:
        loader.join(timeout=5)
        if state.scheduler is not None:
            state.scheduler.close()
            if state.scheduler.spec is not None:
                state.scheduler.spec.close()
        if state.engine is not None:
            state.engine.close()  # a ring: every rank leaves on STOP
        log("stopped")
    return 3 if failed.is_set() else 0


if __name__ == "__main__":
    raise SystemExit(main())
