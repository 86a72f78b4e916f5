"""A sequence's text as its tokens arrive: decoded whole each time (multi-byte characters stay
whole), cut at the first stop string, and handed out only where no stop string can still begin."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop = tokenizer, stop
        self.text = ""  # the text so far, cut at a stop string once one appeared
        self.sent = 0  # characters of `text` handed out
        self.stopped = False  # a stop string appeared

    def update(self, ids: list[int]) -> str:
        """The new text that is safe to send after `ids` (all tokens so far)."""
        if self.stopped:
            return ""
        text = self.tok.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self.flush()
        self.text = text
        safe = len(text) - self._held(text)
        delta = text[self.sent:safe]
        self.sent = max(self.sent, safe)
        return delta

    def flush(self) -> str:
        """What is left to send when the sequence has ended."""
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta

    def _held(self, text: str) -> int:
        """Characters at the end to hold back: an unfinished character, or the start of a stop string."""
        if text.endswith("\ufffd"):
            return len(text) - len(text.rstrip("\ufffd"))
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held
