"""A sequence's text as its tokens arrive: decoded whole each time (multi-byte characters stay
whole), cut at the first stop string, and handed out only where no stop string can still begin."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop = tokenizer, stop
        self.text = ""  # the text so far, cut at a stop string once one appeared
        self.sent = 0  # characters of `text` handed out
        self.matched: str | None = None  # the stop string that appeared (the earliest; ties: the first listed)

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def update(self, ids: list[int]) -> str:
        """The new text that is safe to send after `ids` (all tokens so far)."""
        if self.stopped:
            return ""
        text = self.tok.decode(ids, skip_special_tokens=True)
        hits = [(at, n) for n, s in enumerate(self.stop) if (at := text.find(s)) >= 0]
        if hits:
            cut, n = min(hits)
            self.text, self.matched = text[:cut], self.stop[n]
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
            tail = text[len(text) - min(len(s) - 1, len(text)):]  # where a stop string can still begin
            at = tail.find(s[0])  # only where its first character is: long stop strings stay cheap
            while at >= 0 and len(tail) - at > held:
                if s.startswith(tail[at:]):
                    held = len(tail) - at
                    break
                at = tail.find(s[0], at + 1)
        return held
