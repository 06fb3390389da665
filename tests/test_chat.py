"""Chat templates from GGUF metadata, against llama.cpp's built-in renderers."""

import json
from pathlib import Path

import pytest

from prima_ref import chat
from prima_ref.gguf_file import GGUFModel
from prima_ref.tokenizer import Tokenizer

ORACLE = Path(__file__).parent / "data" / "oracle"


@pytest.fixture(scope="session")
def smollm2_get(smollm2_path):
    return GGUFModel.open(smollm2_path).get


@pytest.fixture(scope="session")
def gemma3_get(gemma3_path):
    return GGUFModel.open(gemma3_path).get


def _oracle_chats(name: str) -> list[dict]:
    return json.loads((ORACLE / name).read_text(encoding="utf-8"))["chat"]


def test_smollm2_template_renders_chatml_as_llama_cpp(smollm2_get):
    template = chat.template_from_metadata(smollm2_get)
    cases = [c for c in _oracle_chats("smollm2-135m-q4_1.json")
             if c["messages"][0]["role"] == "system"]
    assert cases
    for case in cases:
        assert chat.render(template, case["messages"]) == case["llama_cpp"]


def test_smollm2_template_adds_its_default_system_prompt(smollm2_get):
    template = chat.template_from_metadata(smollm2_get)
    text = chat.render(template, [{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    no_prompt = chat.render(template, [{"role": "user", "content": "Hi"}],
                            add_generation_prompt=False)
    assert no_prompt.endswith("Hi<|im_end|>\n")


def test_gemma3_without_a_template_gets_gemma3s_own(gemma3_get):
    assert gemma3_get("tokenizer.chat_template", None) is None
    assert chat.template_from_metadata(gemma3_get) == chat.GEMMA3_TEMPLATE


def test_gemma3_template_renders_as_llama_cpp_after_bos_strip(gemma3_get):
    tok = Tokenizer.from_metadata(gemma3_get)
    template = chat.template_from_metadata(gemma3_get)
    for case in _oracle_chats("gemma3-270m-q4_k_m.json"):
        assert chat.render_for(tok, template, case["messages"]) == case["llama_cpp"]
        with_bos = chat.render(template, case["messages"], bos_token="<bos>")
        assert with_bos == "<bos>" + case["llama_cpp"]


def test_prompt_encodes_with_exactly_one_bos(gemma3_get):
    tok = Tokenizer.from_metadata(gemma3_get)
    text = chat.render_for(tok, chat.GEMMA3_TEMPLATE, [{"role": "user", "content": "Hi"}])
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]


def test_template_exception_becomes_chat_template_error():
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(chat.ChatTemplateError, match="roles must alternate"):
        chat.render(chat.GEMMA3_TEMPLATE, two_users)


def test_sandbox_blocks_python_internals():
    with pytest.raises(chat.ChatTemplateError):
        chat.render("{{ ''.__class__.__mro__[1].__subclasses__() }}",
                    [{"role": "user", "content": "x"}])


def test_template_syntax_error_names_the_line():
    with pytest.raises(chat.ChatTemplateError, match="line 2"):
        chat.render("ok\n{% for %}", [{"role": "user", "content": "x"}])


def test_message_without_role_is_an_error():
    with pytest.raises(chat.ChatTemplateError, match="message 0 needs 'role'"):
        chat.render(chat.CHATML_TEMPLATE, [{"content": "x"}])


def test_unknown_architecture_without_template_falls_back_to_chatml():
    meta = {"general.architecture": "qwen2"}
    template = chat.template_from_metadata(lambda k, d=None: meta.get(k, d))
    assert template == chat.CHATML_TEMPLATE
    text = chat.render(template, [{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
