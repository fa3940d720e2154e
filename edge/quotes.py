"""How an answer's source line is shown to a person (serial terminal, CLI).

The phrase memory gives a candidate a ``quote``: the line it was found in and the
work (title, author, dynasty). The kiosk page renders the same fields itself.
"""

from __future__ import annotations

from typing import Any


def quote_line(candidate: dict[str, Any]) -> str | None:
    """'床前明月光，疑是地上霜。——李白《静夜思》（唐）' for a candidate the phrase memory
    found in a known work; None otherwise."""
    quote = candidate.get("quote")
    if not isinstance(quote, dict) or not quote.get("text"):
        return None
    source = quote.get("author", "")
    if quote.get("title"):
        source += f"《{quote['title']}》"
    if quote.get("dynasty"):
        source += f"（{quote['dynasty']}）"
    return quote["text"] + (f" ——{source}" if source else "")
