"""Chat prompts in the model's own format, and conversations that keep their KV cache.

A checkpoint's chat template (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`) is rendered the way transformers' `apply_chat_template` renders it
(`transformers/utils/chat_template_utils.py`): a sandboxed Jinja environment with
`trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that does not
escape HTML, `raise_exception`/`strftime_now` globals, and the tokenizer's named special
tokens (`bos_token`, `eos_token`, ...) as variables. The same template and messages give the
same string; tests hold it against transformers.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dynaexq_jax import inputs
from dynaexq_jax.errors import UserError

# The named special tokens transformers passes to every template (`special_tokens_map`).
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(UserError):
    """A chat template that cannot be read or rendered."""


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    # Templates come from downloaded checkpoints: untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value) -> str | None:
    # tokenizer_config.json stores a special token as its text or as a serialized AddedToken.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template does not parse ({e.message}, line {e.lineno})") from None
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages` ([{"role", "content"}]); `kwargs` (e.g.
        `enable_thinking=False`) reach the template as variables, over the special tokens."""
        try:
            return self._template.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs},
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed: {' '.join(str(e).split())}") from None


def load_chat_template(path: str | Path) -> ChatTemplate | None:
    """The checkpoint's chat template, or None when it has none.

    `chat_template.jinja` wins over `tokenizer_config.json`'s field, as in transformers; a
    field holding several named templates yields the one named "default".
    """
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    config = {}
    fix = "restore it from the model's release"
    if config_file.is_file():
        config = inputs.read_json(config_file, fix, error=ChatTemplateError)
        if not isinstance(config, dict):
            raise ChatTemplateError(f"{config_file} holds a JSON {type(config).__name__}, not an object; {fix}")
    jinja_file = path / "chat_template.jinja"
    source = inputs.read_text(jinja_file, fix, error=ChatTemplateError) if jinja_file.is_file() else \
        config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if "default" not in named:
            raise ChatTemplateError(f"{config_file} has chat templates {sorted(map(str, named))} but none named "
                                    "'default'")
        source = named["default"]
    if not source:
        return None
    special = {k: _token_text(config[k]) for k in _SPECIAL_TOKENS if _token_text(config.get(k)) is not None}
    return ChatTemplate(source, special)

