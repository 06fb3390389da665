"""prima-cli end to end in a real process on the real default model."""

import json
import subprocess
import sys


def _cli(*args, input_text=None, timeout=300):
    cmd = [sys.executable, "-m", "prima_ref.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, input=input_text, timeout=timeout)


def test_cli_greedy_prompt_streams_text_and_writes_stats(smollm2_path, tmp_path):
    stats = tmp_path / "stats.json"
    res = _cli("-m", str(smollm2_path), "-p", "The capital of France is", "-n", "6", "--temp", "0",
               "-t", "2", "--stats-json", str(stats))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("The capital of France is")
    assert "Paris" in res.stdout[len("The capital of France is"):]
    assert "prompt eval time" in res.stderr and "eval time" in res.stderr
    figures = json.loads(stats.read_text())
    assert figures["prompt_tokens"] == 5 and figures["extra"]["generated_tokens"] == 6
    assert figures["peak_rss_mib"] > 0 and figures["eval_tokens_per_s"] > 0


def test_cli_no_display_prompt_prints_only_the_continuation(smollm2_path):
    res = _cli("-m", str(smollm2_path), "-p", "The capital of France is", "-n", "3", "--temp", "0",
               "--no-display-prompt")
    assert res.returncode == 0, res.stderr
    assert not res.stdout.startswith("The capital")


def test_cli_chat_mode_answers_each_turn_with_the_template_and_quits(smollm2_path):
    from prima_ref.chat import render_for, template_from_metadata
    from prima_ref.engine import Engine
    from prima_ref.sampling import Sampler, SamplingParams

    system, question = "You are a concise assistant.", "What is the capital of France?"
    res = _cli("-m", str(smollm2_path), "-cnv", "-n", "12", "--temp", "0", "-sys", system,
               input_text=f"{question}\nquit\n")
    assert res.returncode == 0, res.stderr
    engine = Engine(smollm2_path, n_ctx=512)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    text = render_for(engine.tokenizer, template_from_metadata(engine.gguf.get), messages)
    ids = engine.tokenizer.encode(text, add_special=True, parse_special=True)
    out, _ = engine.generate(ids, 12, Sampler(SamplingParams(temperature=0)))
    reply = engine.tokenizer.decode(out)
    assert reply.strip() and reply in res.stdout


def test_cli_rejects_missing_and_malformed_model_files(tmp_path):
    res = _cli("-m", str(tmp_path / "nope.gguf"), "-p", "x")
    assert res.returncode != 0 and "not found" in res.stderr + res.stdout
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    res = _cli("-m", str(bad), "-p", "x")
    assert res.returncode == 1 and "cannot load" in res.stderr and "Traceback" not in res.stderr
