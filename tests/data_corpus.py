"""Small corpora for the data tests: text with Unicode and odd whitespace, in nested directories."""

from __future__ import annotations

import random
from pathlib import Path

TRICKY = [
    "héllo wörld, naïve café — “quotes” ‘and’ «guillemets»",
    "emoji 😀🧪👩‍👩‍👧 and CJK 中文字符 and Hangul 한국어 and Arabic العربية ١٢٣",
    "tabs\tand\t\ttabs, CRLF\r\nline, lone CR\rhere, form feed\x0c, vertical tab\x0b",
    "no-break\u00a0space, ideographic\u3000space, line\u2028separator, zero\u200bwidth, BOM\ufeff",
    "combining e\u0301 vs é, Ⅻ roman, ² superscript, ǅ titlecase, ﬁ ligature",
    "contractions: it's we're they've I'm we'll he'd IT'S",
    "    indented code:\n        return f(x) + 1  # comment\n\n\n",
    "trailing spaces   \n   \n\t\n",
]
WORDS = ["def", "return", "self", "value", "data", "token", "model", "layer", "print", "import", "x", "y"]


def make_text(rng: random.Random, n_lines: int) -> str:
    lines = []
    for _ in range(n_lines):
        if rng.random() < 0.2:
            lines.append(rng.choice(TRICKY))
        else:
            indent = " " * (4 * rng.randint(0, 3))
            lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))))
    return "\n".join(lines) + "\n"


def write_corpus(root: Path, n_docs: int = 16, seed: int = 0, lines: tuple[int, int] = (20, 60)) -> list[Path]:
    """`n_docs` UTF-8 text files under `root` (some in subdirectories); returns them sorted."""
    rng = random.Random(seed)
    paths = []
    for i in range(n_docs):
        sub = root / ("" if i % 3 else f"sub{i % 2}")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"doc{i:03d}.txt"
        path.write_text(make_text(rng, rng.randint(*lines)), encoding="utf-8")
        paths.append(path)
    return sorted(paths)
