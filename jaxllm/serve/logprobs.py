"""Token log-probabilities as OpenAI shows them: the legacy completions object and the chat `content` list.

Pure functions (no Flask, no threads). The engine scores tokens (`jaxllm.scoring`) and hands over a
`Scores` (ids and numbers); here they become token strings, byte lists and text offsets:

- `token_bytes(tokenizer, id)`: a token's raw bytes (byte-level BPE: its string mapped back through
  GPT-2's byte-to-unicode table; SentencePiece: `▁` is a space, `<0xNN>` a byte);
- `token_string(tokenizer, id)`: its text, or `bytes:\\xNN…` (lowercase hex escapes) when its bytes
  are not valid UTF-8 on their own (a piece of a multi-byte character), as OpenAI writes them;
- `legacy(...)`: `{tokens, token_logprobs, top_logprobs, text_offset}`; `chat_content(...)`: chat's.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

from jaxllm.errors import InputError

MAX_TOP = 20  # alternatives per token at most (OpenAI's chat limit); `jaxllm.scoring` computes this many

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class Scoring:
    """What a request wants scored: the prompt too (`echo`), and `top` alternatives per token."""

    echo: bool = False
    top: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.top <= MAX_TOP:
            raise InputError(f"top must be between 0 and {MAX_TOP}, got {self.top}")


class Scores(NamedTuple):
    """Scored tokens of one choice: ids, each one's log-probability (None for a sequence's first
    token: nothing precedes it) and its position's best alternatives as (id, log-probability)."""

    tokens: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


def _raw(tokenizer: Any) -> Any:
    return getattr(tokenizer, "tokenizer", tokenizer)  # a TextCodec's tokenizers.Tokenizer


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    from jaxllm.data.tokenizer import byte_to_unicode

    return {ch: b for b, ch in byte_to_unicode().items()}


@lru_cache(maxsize=16)
def _is_byte_level(tok: Any) -> bool:
    decoder = getattr(tok, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The raw bytes of one token (what it adds to the text)."""
    tok = _raw(tokenizer)
    piece = tok.id_to_token(int(token_id))
    if piece is None:
        return b""
    table = _unicode_to_byte()
    if _is_byte_level(tok) and all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    if (m := _BYTE_FALLBACK.fullmatch(piece)) is not None:
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def token_string(tokenizer: Any, token_id: int) -> str:
    """The token's text, or `bytes:\\xNN…` when its bytes alone are not valid UTF-8 (OpenAI's notation)."""
    return bytes_string(token_bytes(tokenizer, token_id))


def bytes_string(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def text_offsets(pieces: Sequence[bytes]) -> list[int]:
    """Each token's character offset in the text of the joined pieces (decoded as UTF-8 with U+FFFD for
    bad bytes, as tokenizers decode): the characters complete before its first byte, so a token that
    continues a character points at that character."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    offsets, chars = [], 0
    for raw in pieces:
        pending = decoder.getstate()[0]  # bytes of a character not complete yet
        if pending and raw:  # does this token complete that character, or turn it into U+FFFD first?
            peek = codecs.getincrementaldecoder("utf-8")("replace")
            peek.setstate(decoder.getstate())
            offsets.append(chars + peek.decode(raw[:1]).startswith("\ufffd"))
        else:
            offsets.append(chars)
        chars += len(decoder.decode(raw))
    return offsets


def legacy(scores: Scores, tokenizer: Any, top: int) -> dict[str, Any]:
    """OpenAI's completions `logprobs` object (offsets from the start of the choice's text)."""
    pieces = [token_bytes(tokenizer, t) for t in scores.tokens]
    return {
        "tokens": [bytes_string(p) for p in pieces],
        "token_logprobs": list(scores.logprobs),
        "top_logprobs": [
            None if alts is None else {token_string(tokenizer, i): lp for i, lp in alts[:top]} for alts in scores.top
        ],
        "text_offset": text_offsets(pieces),
    }


def _entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    raw = token_bytes(tokenizer, token_id)
    return {"token": bytes_string(raw), "logprob": logprob, "bytes": list(raw)}


def chat_content(scores: Scores, tokenizer: Any, top: int) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}, …]}`."""
    content = []
    for token, lp, alts in zip(scores.tokens, scores.logprobs, scores.top, strict=True):
        entry = _entry(tokenizer, token, lp if lp is not None else 0.0)
        entry["top_logprobs"] = [_entry(tokenizer, i, v) for i, v in (alts or [])[:top]]
        content.append(entry)
    return {"content": content}
