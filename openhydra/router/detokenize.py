"""Incremental detokenization and stop-string matching across token boundaries.

Decoding token by token breaks multi-byte characters and merges (SentencePiece/BPE spaces), so we
decode a short window of recent tokens and emit only the new, complete text (the approach TGI and
vLLM use). Stop strings are matched on the accumulated text; text that could still be the start of a
stop string is held back until it can't, so a stop string is never emitted, even split over tokens.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_tail: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = list(prompt_tail or [])
        self.prefix_offset = len(self.tokens)
        self.read_offset = len(self.tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.tokens.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        new_text = decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return delta
        return ""


class StopMatcher:
    """Feeds text through; returns what is safe to emit and whether a stop string was hit."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.longest = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            index = min(h[0] for h in hits)
            emit, self.pending = self.pending[:index], ""
            return emit, True
        # hold back the longest suffix that is a prefix of some stop string
        hold = 0
        for k in range(1, min(self.longest, len(self.pending)) + 1):
            tail = self.pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                hold = k
        emit = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return emit, False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest
