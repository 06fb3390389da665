"""prima-server as a real process on loopback, driven by the official openai client and raw
HTTP: greedy answers equal prima-cli's (one rank and a two-rank ring), bad input gets 4xx in
OpenAI's error shape and the server keeps serving, a client that leaves mid-stream frees its
slot, /health is 503 until the ring has formed, and --api-key is enforced.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx
import openai
import pytest
from ring_helpers import Children, cli, free_port_base, write_plan

from prima_ref.chat import render_for, template_from_metadata
from prima_ref.gguf_file import GGUFModel
from prima_ref.ring.launch import LocalRing
from prima_ref.tokenizer import Tokenizer

KEY = "test-key-123"
QUESTION = "What is the capital of France? Answer in one sentence."
PROMPT = "Once upon a time, in a small village by the sea, there lived"
N = 16


def server_cmd(model, port, *args) -> list[str]:
    return [sys.executable, "-m", "prima_ref.server", "-m", str(model), "--port", str(port),
            "-t", "1", *map(str, args)]


def wait_health(base: str, proc, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server never became healthy")


def cli_output(ch: Children, name: str, model, prompt: str, n: int) -> str:
    p = ch.start(name, cli("-m", model, "-p", prompt, "-n", n, "--temp", "0", "-c", 256,
                           "--no-display-prompt", "-t", 1))
    assert p.wait(120) == 0, ch.logs()
    out = ch.out(name)
    assert out.endswith("\n")
    return out[:-1]


def chat_prompt_text(model) -> str:
    with GGUFModel.open(model) as g:
        tok = Tokenizer.from_metadata(g.get)
        return render_for(tok, template_from_metadata(g.get), [{"role": "user", "content": QUESTION}])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smollm2_path):
    """prima-cli's greedy continuations of the chat prompt and of the plain prompt."""
    d = tmp_path_factory.mktemp("cli")
    with Children(d) as ch:
        chat = cli_output(ch, "chat", smollm2_path, chat_prompt_text(smollm2_path), N)
        text = cli_output(ch, "text", smollm2_path, PROMPT, N)
    assert chat and text
    return {"chat": chat, "text": text}


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_path):
    """One-rank server with two slots and an API key."""
    d = tmp_path_factory.mktemp("server")
    port = free_port_base(1)
    with Children(d) as ch:
        p = ch.start("server", server_cmd(smollm2_path, port, "-np", 2, "-c", 1024,
                                          "--api-key", KEY, "--alias", "smol"))
        base = f"http://127.0.0.1:{port}"
        wait_health(base, p)
        yield {"base": base, "proc": p, "ch": ch}
        assert p.poll() is None, ch.logs()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)


def chat_kwargs(**kw):
    return dict(model="smol", messages=[{"role": "user", "content": QUESTION}], temperature=0,
                max_tokens=N, **kw)


def test_models_and_health(server):
    models = client(server["base"]).models.list()
    assert [m.id for m in models.data] == ["smol"]
    h = httpx.get(server["base"] + "/health").json()
    assert h["status"] == "ok" and h["slots"] == 2
    # SmolLM2's types have batched decode kernels: always one batch, nothing timed at startup
    assert h["decode_batched"] is True and h["decode_ms_by_rows"] == {}


def test_chat_greedy_equals_prima_cli(server, reference):
    c = client(server["base"])
    r = c.chat.completions.create(**chat_kwargs())
    assert r.choices[0].message.content == reference["chat"]
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= N and r.usage.prompt_tokens > 10
    pieces, usage, finish = [], None, None
    for chunk in c.chat.completions.create(**chat_kwargs(stream=True,
                                                         stream_options={"include_usage": True})):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == reference["chat"]
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens
    assert finish == r.choices[0].finish_reason


def test_completion_greedy_equals_prima_cli(server, reference):
    c = client(server["base"])
    r = c.completions.create(model="smol", prompt=PROMPT, temperature=0, max_tokens=N)
    assert r.choices[0].text == reference["text"]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="smol", prompt=PROMPT, temperature=0, max_tokens=N, stream=True) if ch.choices)
    assert streamed == reference["text"]


def test_stop_seed_and_concurrent_requests(server, reference):
    c = client(server["base"])
    words = reference["text"].split()
    stop = " " + words[2]
    r = c.completions.create(model="smol", prompt=PROMPT, temperature=0, max_tokens=N, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == reference["text"][: reference["text"].index(stop)]
    sampled = [c.completions.create(model="smol", prompt=PROMPT, temperature=1.0, seed=7,
                                    max_tokens=8).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    concurrent_pair(server["base"], reference["chat"], batched=True)


def concurrent_pair(base: str, want: str, batched: bool = False) -> None:
    """Two greedy requests at once, each answer prima-cli's (want); batched: the slots share
    decode steps (SmolLM2's legacy quants: each batched row bit-equal to a one-row step)."""
    c = client(base)
    before = httpx.get(base + "/health").json()
    out = [None, None]

    def go(i):
        out[i] = c.chat.completions.create(**chat_kwargs()).choices[0]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [o and o.message.content for o in out] == [want, want]
    after = httpx.get(base + "/health").json()
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decode_rows"] - before["decode_rows"]
    assert steps < rows <= 2 * steps if batched else rows <= 2 * steps


BAD = [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (json.dumps({"messages": "hello"}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}).encode(), 400),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}).encode(), 404),
    (b"[" * 100_000 + b"]" * 100_000, 400),
    (b'{"messages": [{"role": "user", "content": "' + b"a" * (10 << 20) + b'"}]}', 413),
]


@pytest.mark.parametrize("body,status", BAD, ids=["malformed", "array", "messages-type",
                                                  "temperature-type", "max-tokens-float",
                                                  "stream-type", "role", "huge-max-tokens",
                                                  "unknown-model", "deep-nesting", "10MB"])
def test_bad_input_gets_4xx_and_server_keeps_serving(server, body, status):
    r = httpx.post(server["base"] + "/v1/chat/completions", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    ok = client(server["base"]).completions.create(model="smol", prompt="Hi", max_tokens=2)
    assert ok.choices[0].text is not None


def test_openai_client_sees_errors(server):
    c = client(server["base"])
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(**{**chat_kwargs(), "model": "gpt-9"})
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(**{**chat_kwargs(), "max_tokens": 10**6})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server["base"] + "/v1/models").status_code == 401  # no key at all


def _busy(base) -> int:
    return httpx.get(base + "/health").json()["slots_busy"]


def test_disconnect_mid_stream_frees_the_slot(server):
    base, headers = server["base"], {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": PROMPT, "max_tokens": 400, "stream": True, "temperature": 0}
    rows0 = httpx.get(base + "/health").json()["decode_rows"]
    with httpx.stream("POST", base + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [ln for _, ln in zip(range(6), lines)]
        assert any(ln.startswith("data: ") for ln in got)
        assert _busy(base) == 1
    deadline = time.monotonic() + 20
    while _busy(base) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _busy(base) == 0
    assert httpx.get(base + "/health").json()["decode_rows"] - rows0 < 200  # not run to the end
    assert "went away" in server["ch"].err("server")


def test_disconnect_while_waiting_for_a_full_answer_frees_the_slot(server):
    base, headers = server["base"], {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0}
    rows0 = httpx.get(base + "/health").json()["decode_rows"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", json=body, headers=headers, timeout=1.5)
    deadline = time.monotonic() + 20
    while _busy(base) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _busy(base) == 0
    assert httpx.get(base + "/health").json()["decode_rows"] - rows0 < 200


def test_cancel_by_task_id(server):
    base, headers = server["base"], {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": PROMPT, "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.stream("POST", base + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        task = int(r.headers["x-task-id"])
        lines = r.iter_lines()
        next(lines)
        c = httpx.post(base + "/v1/cancel", json={"task_id": task}, headers=headers)
        assert c.status_code == 200 and c.json()["cancelled"]
        rest = list(lines)
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    assert len([ln for ln in rest if ln.startswith("data: {")]) < 400
    r = httpx.post(base + "/v1/cancel", json={"task_id": task}, headers=headers)
    assert r.status_code == 404 and "error" in r.json()


def test_two_rank_ring_server_equals_prima_cli(tmp_path, smollm2_path, reference):
    """Rank 0 is prima-server, rank 1 prima-cli; /health says 503 until rank 1 has joined."""
    plan, _ = write_plan(tmp_path, smollm2_path, [12, 18], ctx=512)
    port = free_port_base(1)
    base = f"http://127.0.0.1:{port}"
    with Children(tmp_path) as ch:
        p = ch.start("server", server_cmd(smollm2_path, port, "--plan", plan, "--rank", 0,
                                          "-np", 2, "--api-key", KEY, "--alias", "smol",
                                          "--decode-batching", "always"))
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and status is None:
            try:
                r = httpx.get(base + "/health", timeout=2)
                status = (r.status_code, r.json()["status"])
            except httpx.TransportError:
                time.sleep(0.2)
        assert status == (503, "forming the ring"), ch.logs()
        with LocalRing(smollm2_path, plan, worker_args=["-t", "1"], log_dir=tmp_path) as ring:
            wait_health(base, p)
            c = client(base)
            r = c.chat.completions.create(**chat_kwargs())
            assert r.choices[0].message.content == reference["chat"], ch.logs() + ring.log(1)
            streamed = "".join(x.choices[0].text for x in c.completions.create(
                model="smol", prompt=PROMPT, temperature=0, max_tokens=N, stream=True) if x.choices)
            assert streamed == reference["text"]
            concurrent_pair(base, reference["chat"], batched=True)  # both slots in one ring pass
            p.terminate()
            assert p.wait(30) == 0, ch.logs()
            assert ring.wait(15) == {1: 0}, ring.log(1)  # rank 1 left on STOP


def test_draft_model_server_equals_prima_cli_without_draft(tmp_path, smollm2_path,
                                                           smollm2_q8_0_path):
    """-md on the server: SmolLM2 Q4_1 drafts for the Q8_0 target; the greedy answer, streamed
    and whole, equals prima-cli's on the target alone (issue 9's flags on prima-server)."""
    port = free_port_base(1)
    with Children(tmp_path) as ch:
        want = cli_output(ch, "cli", smollm2_q8_0_path, PROMPT, N)
        p = ch.start("server", server_cmd(smollm2_q8_0_path, port, "-c", 512, "-md", smollm2_path,
                                          "--draft-min", 1, "--draft-p-min", 0.3, "--alias", "x"))
        base = f"http://127.0.0.1:{port}"
        wait_health(base, p)
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        r = c.completions.create(model="x", prompt=PROMPT, temperature=0, max_tokens=N)
        assert r.choices[0].text == want
        streamed = "".join(k.choices[0].text for k in c.completions.create(
            model="x", prompt=PROMPT, temperature=0, max_tokens=N, stream=True) if k.choices)
        assert streamed == want
        log = ch.err("server")
        assert "[server] draft SmolLM2" in log
        accepted = [int(w.split("/")[0]) for w in log.split() if "/" in w and w[0].isdigit()]
        assert accepted and max(accepted) > 0, log  # the draft's tokens were really used


def test_draft_model_needs_one_slot(smollm2_path):
    import subprocess

    r = subprocess.run(server_cmd(smollm2_path, free_port_base(1), "-np", 2, "-md", smollm2_path),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "-np 1" in r.stderr
