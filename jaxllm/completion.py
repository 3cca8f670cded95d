"""From raw generated tokens to what a caller sees: stop strings, final tokens, streamed text.

Framework-free host logic shared by jaxllm's host API, torch_ref's generation and the server, so a
fix to stop or UTF-8 handling is made once:

- `settle`: which tokens are final while a stop string may still be forming;
- `Collector`: each row's final tokens, its `Completion` and the per-token callback;
- `TextStream`: a row's text handed out in pieces (a partial UTF-8 character waits);
- `text_stops`: the stop list of a text call (the caller's stops plus the end-of-text id).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.request import Request

Decode = Callable[[list[int]], str]


def find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """The index in `text` where the earliest stop string begins, or None."""
    found = [i for s in stop_strings if (i := text.find(s)) >= 0]
    return min(found) if found else None


def _partial_stop_len(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (it may yet complete)."""
    return max((n for s in stop_strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def _tokens_within(tokens: list[int], prefix: str, decode: Decode) -> int:
    """The most leading tokens whose text is a prefix of `prefix`."""
    for j in range(len(tokens), 0, -1):
        if prefix.startswith(decode(tokens[:j])):
            return j
    return 0


def settle(tokens: list[int], stop_strings: Sequence[str], decode: Decode, finished: bool) -> tuple[int, int | None]:
    """(how many leading tokens are final, where a stop string begins in their text or None).

    Without a stop string in the text, tokens are final except those that could be the beginning of
    one (held back until it completes or not); once a stop string appears, the final tokens are
    those whose text ends before it, and generation stops.
    """
    if not stop_strings:
        return len(tokens), None
    text = decode(tokens)
    cut = find_stop(text, stop_strings)
    if cut is not None:
        return _tokens_within(tokens, text[:cut], decode), cut
    if finished:
        return len(tokens), None
    return _tokens_within(tokens, text[: len(text) - _partial_stop_len(text, stop_strings)], decode), None


@dataclass
class Completion:
    """One prompt's result: `tokens` (prompt and stop tokens excluded), `text` when a tokenizer was
    given (cut right before a stop string), and why it ended: "stop" or "length"."""

    tokens: list[int]
    text: str | None
    finish_reason: str


class Collector:
    """Turns each row's raw generated tokens into final ones (stop ids and stop strings), and calls
    the callback once per final token, in order."""

    def __init__(self, req: Request, tokenizer: Any, callback: Callable[[int, int], None] | None):
        self.req, self.callback = req, callback
        self.decode: Decode | None = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else None
        n = len(req.prompts)
        self.delivered, self.final = [0] * n, [False] * n
        self.results: list[Completion | None] = [None] * n

    def update(self, raw: list[list[int]], done: Sequence[bool]) -> list[int]:
        """Take each row's generated tokens so far; returns rows that a stop string has just ended."""
        stop_ids = set(self.req.stop_ids)
        fresh: list[list[int]] = []
        ended = []
        for b, tokens in enumerate(raw):
            if self.final[b]:
                fresh.append([])
                continue
            hit_id = bool(done[b]) and bool(tokens) and tokens[-1] in stop_ids
            if hit_id:
                tokens = tokens[:-1]
            n_final, cut = settle(tokens, self.req.stop_strings, self.decode, bool(done[b]))
            fresh.append(tokens[self.delivered[b] : n_final])
            self.delivered[b] = n_final
            if cut is not None or done[b]:
                self.final[b] = True
                text = None
                if self.decode is not None:
                    text = self.decode(tokens) if cut is None else self.decode(tokens)[:cut]
                reason = "stop" if (cut is not None or hit_id) else "length"
                self.results[b] = Completion(tokens[:n_final], text, reason)
                if cut is not None and not done[b]:
                    ended.append(b)
        if self.callback is not None:
            for i in range(max(map(len, fresh), default=0)):
                for b, new in enumerate(fresh):
                    if i < len(new):
                        self.callback(b, new[i])
        return ended

    @property
    def all_final(self) -> bool:
        return all(self.final)


class TextStream:
    """The text of a growing list of final tokens, handed out in pieces that add up to the whole.

    A token that ends inside a multi-byte UTF-8 character decodes to U+FFFD: that tail waits for
    the tokens that complete it. `finish(text)` gives what is left of the final text.
    """

    def __init__(self, decode: Decode):
        self.decode = decode
        self.tokens: list[int] = []
        self.shown = ""

    def push(self, token: int) -> None:
        self.tokens.append(token)

    def take(self) -> str:
        """Text of the tokens pushed so far beyond what was handed out ("" while none is complete)."""
        text = self.decode(self.tokens).rstrip("\ufffd")
        if not (text.startswith(self.shown) and len(text) > len(self.shown)):
            return ""
        piece, self.shown = text[len(self.shown) :], text
        return piece

    def finish(self, text: str) -> str:
        """The rest of the final `text` (a completion's, cut before any stop string) not yet handed out."""
        piece = text[len(self.shown) :] if text.startswith(self.shown) and len(text) > len(self.shown) else ""
        self.shown += piece
        return piece


def end_ids(tokenizer: Any) -> list[int]:
    """Where generation ends by default: a `TextCodec`'s end ids (the checkpoint's EOS / end-of-turn
    tokens), or a bare tokenizer's end-of-text token."""
    from jaxllm.text import TextCodec

    return TextCodec.wrap(tokenizer).end_ids


def end_of_text_id(tokenizer: Any) -> int | None:
    """The first end id (`end_ids`), or None when there is none."""
    return next(iter(end_ids(tokenizer)), None)


def text_stops(cfg: ModelConfig, tokenizer: Any, stop: str | int | Sequence[str | int]) -> list[str | int]:
    """`stop` plus the tokenizer's end ids that lie inside the model's vocabulary."""
    stop = [stop] if isinstance(stop, str | int) else list(stop)
    return [*stop, *(e for e in end_ids(tokenizer) if e < cfg.vocab_size)]
