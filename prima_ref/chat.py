"""Chat prompts from the GGUF's Jinja chat template, rendered as Hugging Face and llama.cpp do.

The template in `tokenizer.chat_template` is rendered in a sandbox (templates come with
untrusted model files) with `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.
As llama.cpp's common_chat_templates_apply does, a leading BOS text is dropped when the
tokenizer adds BOS itself, so the prompt does not start with two BOS tokens.

A file without a template gets llama.cpp's fallback (ChatML), except gemma3 files, which get
Gemma 3's own template: ChatML would prompt a Gemma model in a format it was not trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The chat template is malformed, or it rejected the conversation."""


# llama.cpp common/chat.cpp CHATML_TEMPLATE_SRC: its choice when the file has no template.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\n' -}}\n"
    "{%- endif -%}"
)

# Gemma 3's template as published with google/gemma-3-*-it (tokenizer_config.json).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

_FALLBACK_BY_ARCH = {"gemma3": GEMMA3_TEMPLATE}

Message = Mapping[str, Any]


def template_from_metadata(get: Callable[[str, Any], Any]) -> str:
    """The file's chat template, else the fallback for its architecture."""
    template = get("tokenizer.chat_template", None)
    if isinstance(template, str) and template.strip():
        return template
    return _FALLBACK_BY_ARCH.get(get("general.architecture", None), CHATML_TEMPLATE)


def render(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    strip_bos: bool = False,
    **extra: Any,
) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]).

    strip_bos: drop a leading `bos_token` from the result; pass the tokenizer's add_bos so
    that encoding with add_special=True gives exactly one BOS (llama.cpp does the same).
    """
    if not messages:
        raise ChatTemplateError("cannot render a chat prompt with no messages")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ChatTemplateError(f"message {k} needs 'role' and 'content' keys, got {m!r}")
    context = dict(extra, messages=[dict(m) for m in messages], bos_token=bos_token,
                   eos_token=eos_token, add_generation_prompt=add_generation_prompt)
    try:
        text = _compile(template).render(**context)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from exc
    if strip_bos and bos_token and text.startswith(bos_token):
        text = text[len(bos_token):]
    return text


def render_for(tokenizer: Any, template: str, messages: Sequence[Message],
               add_generation_prompt: bool = True) -> str:
    """render() with the tokenizer's BOS/EOS texts and its add_bos flag."""
    def text_of(tid: int | None) -> str:
        return "" if tid is None else tokenizer.token_bytes(tid, special=True).decode()
    return render(template, messages, add_generation_prompt=add_generation_prompt,
                  bos_token=text_of(tokenizer.bos_id), eos_token=text_of(tokenizer.eos_id),
                  strip_bos=tokenizer.add_bos)


# --- the Jinja environment (as transformers' apply_chat_template sets it up) ------------------


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template rejected the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not parse (line {exc.lineno}): "
                                f"{exc.message}") from exc
