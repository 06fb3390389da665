"""The OpenAI-compatible HTTP side of prima-server (Starlette routes).

Bodies are read with a size bound, validated field by field, and every failure answers in
OpenAI's shape: {"error": {"message", "type", "param", "code"}}. Streaming answers are SSE
chunks ending in `data: [DONE]`; a client that goes away cancels its request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import threading
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from prima_ref.chat import ChatTemplateError, render_for
from prima_ref.sampling import Sampler, SamplingParams
from prima_ref.server.scheduler import Job, log

DRAIN_LIMIT_BYTES = 64 << 20  # an oversized body is read and dropped up to this, then cut
MAX_STOPS = 4
ROLES = ("system", "user", "assistant", "developer", "tool")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.type, self.code)


def error_response(status, message, param=None, type_="invalid_request_error", code=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}}, status_code=status)


@dataclass
class Settings:
    model_id: str
    api_key: str | None
    max_body_bytes: int
    defaults: SamplingParams  # the server's sampling flags: used where a request says nothing


class State:
    """What the routes share: settings, and the engine + scheduler once loaded."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = None
        self.scheduler = None
        self.template = None
        self.status = "loading model"  # until ready; the reason /health answers 503
        self.created = int(time.time())
        self.mailbox: Mailbox | None = None  # made on the event loop by the first request


class Mailbox:
    """Events from the scheduler thread to the requests' asyncio queues, with one wake-up of
    the event loop per burst: a decode step of n rows posts n events, and each
    call_soon_threadsafe writes to the loop's self-pipe, whose syscall hands the GIL to the
    woken loop thread; the scheduler then waits for that thread's whole turn, once per row.
    Here only the first event of a burst wakes the loop, which takes all that came since."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, tuple]] = []

    def post(self, events: asyncio.Queue, ev: tuple) -> None:
        with self._lock:
            self._items.append((events, ev))
            first = len(self._items) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for events, ev in items:
            events.put_nowait(ev)


# -- request parsing ---------------------------------------------------------------------------

async def read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(request)
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                await _drain(request, len(body))
                raise too_big
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection before the body ended") from None
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON: {err}") from None
    except RecursionError:
        raise ApiError(400, "the body nests JSON too deeply") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(value).__name__}")
    return value


async def _drain(request: Request, seen: int = 0) -> None:
    """Read and drop the rest of a body (up to a bound) so the client gets to see our 413."""
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > DRAIN_LIMIT_BYTES:
                return
    except (ClientDisconnect, RuntimeError):
        return


def _number(body, name, lo, hi, default, *, integer=False, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got "
                            f"{json.dumps(v)[:40]}", param=name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise ApiError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}",
                       param=name)
    return v


def _bool(body, name, default=False):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be a boolean", param=name)
    return v


def _stops(body) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(v) > MAX_STOPS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOPS} strings", param="stop")
    return [s for s in v if s]


def _check_model(state: State, body) -> None:
    m = body.get("model")
    if m is None:
        return
    if not isinstance(m, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if m != state.settings.model_id:
        raise ApiError(404, f"The model '{m}' does not exist; this server serves "
                            f"'{state.settings.model_id}'", param="model", code="model_not_found")


def _sampler(state: State, body) -> Sampler:
    d = state.settings.defaults
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    seed = _number(body, "seed", -(2**63), 2**63 - 1, None, integer=True)
    try:
        params = SamplingParams(
            temperature=_number(body, "temperature", 0.0, 2.0, d.temperature),
            top_p=_number(body, "top_p", 0.0, 1.0, d.top_p, lo_open=True),
            top_k=_number(body, "top_k", 0, 1 << 20, d.top_k, integer=True),
            min_p=_number(body, "min_p", 0.0, 1.0, d.min_p),
            repeat_penalty=_number(body, "repeat_penalty", 0.0, 10.0, d.repeat_penalty, lo_open=True),
            repeat_last_n=d.repeat_last_n,
            seed=d.seed if seed is None else seed % 2**63,
        )
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    return Sampler(params)


def _max_tokens(state: State, body, n_prompt: int) -> int:
    n_ctx = state.engine.n_ctx
    if n_prompt >= n_ctx:
        raise ApiError(400, f"This model's maximum context length is {n_ctx} tokens; the prompt "
                            f"has {n_prompt}", param="messages", code="context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    v = _number(body, name, 1, 2**31, None, integer=True)
    if v is None:
        return n_ctx - n_prompt  # until the context is full
    if n_prompt + v > n_ctx:
        raise ApiError(400, f"This model's maximum context length is {n_ctx} tokens. However, you "
                            f"requested {n_prompt + v} tokens ({n_prompt} in the prompt, {v} for the "
                            "completion)", param=name, code="context_length_exceeded")
    return v


def _content_text(content, k: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{k}].content: only text parts are supported",
                               param=f"messages[{k}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{k}].content must be a string or a list of text parts",
                   param=f"messages[{k}].content")


def _messages(body) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{k}] needs a 'role' among {', '.join(ROLES)}",
                           param=f"messages[{k}].role")
        out.append({"role": m["role"], "content": _content_text(m.get("content"), k)})
    return out


def _prompt_tokens(state: State, body) -> list[int]:
    p = body.get("prompt")
    tok = state.engine.tokenizer
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        ids = tok.encode(p, add_special=True, parse_special=True)
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        n_vocab = state.engine.model.tok_embd.rows.shape[0]
        if min(p) < 0 or max(p) >= n_vocab:
            raise ApiError(400, f"token ids must be in 0..{n_vocab - 1}", param="prompt")
        ids = list(p)
    else:
        raise ApiError(400, "'prompt' must be a string, a list of one string, or a list of token "
                            "ids", param="prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty and the model adds no BOS token", param="prompt")
    return ids


# -- routes ------------------------------------------------------------------------------------

def build_app(state: State, cors_origins: list[str] | None = None) -> Starlette:
    async def guarded(request: Request, handler):
        if state.settings.api_key is not None:
            got = request.headers.get("authorization", "")
            want = f"Bearer {state.settings.api_key}"
            if not hmac.compare_digest(got.encode(), want.encode()):
                return error_response(401, "Invalid API key: send 'Authorization: Bearer <key>'",
                                      type_="authentication_error", code="invalid_api_key")
        if state.scheduler is None:
            return error_response(503, state.status, type_="unavailable_error", code="loading")
        if state.scheduler.failure is not None:
            return error_response(503, f"the model failed: {state.scheduler.failure}",
                                  type_="server_error", code="engine_failed")
        try:
            return await handler(request)
        except ApiError as err:
            return err.response()

    def route(path, handler, methods):
        async def endpoint(request):
            return await guarded(request, handler)
        return Route(path, endpoint, methods=methods)

    async def health(request: Request):
        if state.scheduler is None:
            return JSONResponse({"status": state.status}, status_code=503)
        if state.scheduler.failure is not None:
            return JSONResponse({"status": "error", "error": state.scheduler.failure}, status_code=503)
        return JSONResponse({"status": "ok", "slots_busy": state.scheduler.busy_slots(),
                             "slots": state.scheduler.n_slots, **state.scheduler.stats,
                             "decode_batched": state.scheduler.batched,
                             "decode_ms_by_rows": {str(n): round(t * 1e3, 2) for n, t in
                                                   sorted(state.scheduler.step_s.items())}})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": state.settings.model_id, "object": "model", "created": state.created,
             "owned_by": "prima-ref"}]})

    async def chat(request: Request):
        body = await read_json(request, state.settings.max_body_bytes)
        _check_model(state, body)
        messages = _messages(body)
        try:
            text = render_for(state.engine.tokenizer, state.template, messages)
        except ChatTemplateError as err:
            raise ApiError(400, str(err), param="messages") from None
        ids = state.engine.tokenizer.encode(text, add_special=True, parse_special=True)
        return await _complete(state, request, body, ids, chat=True)

    async def completions(request: Request):
        body = await read_json(request, state.settings.max_body_bytes)
        _check_model(state, body)
        if _bool(body, "echo"):
            raise ApiError(400, "'echo' is not supported", param="echo")
        return await _complete(state, request, body, _prompt_tokens(state, body), chat=False)

    async def cancel(request: Request):
        body = await read_json(request, state.settings.max_body_bytes)
        task = body.get("task_id")
        if isinstance(task, bool) or not isinstance(task, int):
            raise ApiError(400, "'task_id' must be an integer", param="task_id")
        if not state.scheduler.cancel(task):
            raise ApiError(404, f"no running or queued task {task}", param="task_id",
                           code="task_not_found")
        return JSONResponse({"task_id": task, "cancelled": True})

    async def not_found(request: Request, exc: HTTPException):
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                              type_="invalid_request_error" if exc.status_code < 500 else "server_error")

    async def crashed(request: Request, exc: Exception):
        log(f"{request.method} {request.url.path} failed: {type(exc).__name__}: {exc}")
        return error_response(500, f"internal error: {type(exc).__name__}", type_="server_error")

    routes = [
        Route("/health", health, methods=["GET"]),
        route("/v1/models", models, ["GET"]),
        route("/v1/chat/completions", chat, ["POST"]),
        route("/v1/completions", completions, ["POST"]),
        route("/v1/cancel", cancel, ["POST"]),
    ]
    middleware = []
    if cors_origins:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=cors_origins,
                                     allow_methods=["GET", "POST"],
                                     allow_headers=["authorization", "content-type"]))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: not_found, Exception: crashed})


async def _complete(state: State, request: Request, body: dict, ids: list[int], *, chat: bool):
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = _bool(so or {}, "include_usage")
    sampler = _sampler(state, body)
    stops = _stops(body)
    max_tokens = _max_tokens(state, body, len(ids))
    if state.mailbox is None:
        state.mailbox = Mailbox(asyncio.get_running_loop())
    post = state.mailbox.post
    events: asyncio.Queue = asyncio.Queue()
    sched = state.scheduler
    job = Job(sched.new_id(), ids, max_tokens, sampler, stops, emit=lambda ev: post(events, ev))
    try:
        sched.submit(job)
    except queue.Full:
        raise ApiError(503, "too many requests are waiting; retry later", type_="server_error",
                       code="queue_full") from None
    except RuntimeError as err:
        raise ApiError(503, str(err), type_="server_error") from None
    shape = _Shape(state, job, chat, len(ids))
    headers = {"X-Task-Id": str(job.id)}
    if stream:
        return StreamingResponse(_sse(shape, events, job, include_usage),
                                 media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    return await _collect(shape, events, job, request, headers)


class _Shape:
    """Builds the OpenAI objects of one request (chat or text completion)."""

    def __init__(self, state: State, job: Job, chat: bool, n_prompt: int):
        self.chat, self.n_prompt, self.job = chat, n_prompt, job
        self.model, self.created = state.settings.model_id, int(time.time())
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{job.id}"

    def usage(self) -> dict:
        n = len(self.job.out)
        return {"prompt_tokens": self.n_prompt, "completion_tokens": n,
                "total_tokens": self.n_prompt + n}

    def _obj(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def full(self, text: str, finish: str) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            return self._obj("chat.completion", [choice], usage=self.usage())
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._obj("text_completion", [choice], usage=self.usage())

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", "content": ""}
            return self._obj("chat.completion.chunk",
                             [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        return self._obj("text_completion", [{"index": 0, "text": text or "", "logprobs": None,
                                              "finish_reason": finish}])

    def usage_chunk(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._obj(kind, [], usage=self.usage())


def _sse_line(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


async def _sse(shape: _Shape, events: asyncio.Queue, job: Job, include_usage: bool):
    """SSE chunks; Starlette cancels this generator when the client disconnects, and the
    finally block then frees the slot."""
    try:
        if shape.chat:
            yield _sse_line(shape.chunk(None, first=True))
        while True:
            ev = await events.get()
            if ev[0] == "text":
                yield _sse_line(shape.chunk(ev[1]))
            elif ev[0] == "error":
                yield _sse_line({"error": {"message": ev[2], "type": "server_error",
                                           "param": None, "code": None}})
                break
            else:
                yield _sse_line(shape.chunk(None, finish="stop" if ev[1] == "cancelled" else ev[1]))
                if include_usage:
                    yield _sse_line(shape.usage_chunk())
                break
        yield b"data: [DONE]\n\n"
    finally:
        if not job.finished:
            log(f"task {job.id}: the client went away; freeing its slot")
        job.cancelled.set()


async def _collect(shape: _Shape, events: asyncio.Queue, job: Job, request: Request, headers):
    """A non-streaming answer; a client that disconnects meanwhile cancels the job."""

    async def watch():  # the body is read: the next ASGI message can only be the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not job.finished:
            log(f"task {job.id}: the client went away; freeing its slot")
        job.cancelled.set()
        events.put_nowait(("gone",))

    watcher = asyncio.create_task(watch())
    pieces = []
    try:
        while True:
            ev = await events.get()
            if ev[0] == "text":
                pieces.append(ev[1])
            elif ev[0] == "gone":
                return error_response(499, "client closed the request")
            elif ev[0] == "error":
                return error_response(ev[1], ev[2], type_="server_error")
            else:
                return JSONResponse(shape.full("".join(pieces), ev[1]), headers=headers)
    finally:
        watcher.cancel()
        job.cancelled.set()  # no effect on a finished job
