"""User text to token ids: a prompt through the checkpoint's chat template (or as it is), the
turns of a conversation that fit its context, and stdin's lines checked as UTF-8."""

from __future__ import annotations

from pathlib import Path

from dynaexq_jax.launch.flags import FlagError
from dynaexq_jax.launch.options import PromptOptions


class Prompter:
    """Turns user text into token ids: through the chat template when chatting, else as is."""

    def __init__(self, prompts: PromptOptions, model: Path, tok):
        from dynaexq_jax.io import chat

        template = chat.load_chat_template(model)
        if prompts.chat and template is None:
            raise FlagError(f"{model} has no chat template (tokenizer_config.json or chat_template.jinja); drop --chat")
        self.template = template if prompts.chat is not False else None
        if self.template is None and (prompts.system is not None or prompts.thinking is not None):
            raise FlagError(f"--system and --thinking need a chat template, and {model} has none")
        self.tok = tok
        self.system = prompts.system
        self.kwargs = {} if prompts.thinking is None else {"enable_thinking": prompts.thinking}

    def messages(self, user: str) -> list[dict]:
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        return system + [{"role": "user", "content": user}]

    def render(self, messages: list[dict]) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=True, **self.kwargs)
        # The template writes the special tokens itself, as apply_chat_template(tokenize=True).
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode(self, user: str) -> list[int]:
        return self.render(self.messages(user)) if self.template else self.tok.encode(user).ids

    def stop_ids(self, eos: tuple[int, ...]) -> tuple[int, ...]:
        """The checkpoint's EOS ids, and the template's end of turn (tokenizer_config eos_token)."""
        if self.template is None:
            return eos
        end = self.template.special_tokens.get("eos_token")
        end_id = self.tok.token_to_id(end) if end else None
        return tuple(eos) + ((end_id,) if end_id is not None and end_id not in eos else ())


class Conversation:
    """The finished turns of a session, as the model sees them: through the chat template, or
    as the raw token stream continued. When the next turn does not fit the session, its oldest
    turns are dropped."""

    def __init__(self, prompter: Prompter):
        self.prompter = prompter
        self.turns: list[tuple[str, list[int]]] = []  # (user text, reply ids)

    def ids(self, user: str, turns) -> list[int]:
        p = self.prompter
        if p.template:
            history = [{"role": r, "content": c} for u, reply in turns
                       for r, c in (("user", u), ("assistant", p.tok.decode(reply, skip_special_tokens=True)))]
            system_and_user = p.messages(user)
            return p.render(system_and_user[:-1] + history + system_and_user[-1:])
        return [t for u, reply in turns for t in p.tok.encode(u).ids + reply] + p.tok.encode(user).ids

    def fit(self, user: str, limit: int) -> tuple[list[int], int] | None:
        """(ids of the next turn, oldest turns dropped) within `limit` tokens; None if it does
        not fit even alone."""
        for dropped in range(len(self.turns) + 1):
            ids = self.ids(user, self.turns[dropped:])
            if len(ids) <= limit:
                self.turns = self.turns[dropped:]
                return ids, dropped
        return None


def stdin_lines(stdin):
    """Lines of stdin as text; bytes that are not UTF-8 are an error naming the line."""
    for n, line in enumerate(getattr(stdin, "buffer", stdin), 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FlagError(f"line {n} of stdin is not UTF-8 text (byte {line[e.start]:#04x} at {e.start}); "
                                "send UTF-8") from None
        yield line
