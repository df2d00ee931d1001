"""Tokens shaded by attention weight: for a terminal (ANSI escape codes) and for HTML.

Weights are scaled by their maximum, so the most attended token is always fully shaded and a
sentence whose weights are all small still shows which tokens stand out. Token text is never
trusted: control characters are made visible in the terminal and HTML is escaped, so a token
such as ``<script>`` or ``"\\x1b[2J"`` shows as text and does nothing.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from torch import Tensor

from qkv.viz._checks import GENERATOR_META, as_weights, check_nonnegative, token_labels

__all__ = ["html_document", "shade_tokens_ansi", "shade_tokens_html"]

# Shade from white (weight 0) to this colour (the maximum weight).
HOT_RGB = (230, 85, 13)
RESET = "\x1b[0m"


def _relative_weights(tokens: Sequence[str], weights: Tensor) -> tuple[list[str], list[float]]:
    """Labels and weights scaled to ``[0, 1]`` by the maximum (all zeros stay zeros)."""
    values = as_weights(weights, "weights", 1, "(N,)")
    check_nonnegative(values, "weights")
    labels = token_labels(tokens, values.shape[0], "tokens")
    top = float(values.max())
    scaled = (values / top if top > 0 else values).tolist()
    return labels, scaled


def _shade(level: float) -> tuple[int, int, int]:
    """Linear blend from white to ``HOT_RGB``."""
    r, g, b = (round(255 + (c - 255) * level) for c in HOT_RGB)
    return r, g, b


def _visible(token: str) -> str:
    """Control characters (ESC, newline, ...) written as escapes so they cannot drive the terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in token)


def _ansi_256(rgb: tuple[int, int, int]) -> int:
    """Nearest colour of the xterm 6x6x6 cube (codes 16..231)."""
    r, g, b = (round(c / 255 * 5) for c in rgb)
    return 16 + 36 * r + 6 * g + b


def shade_tokens_ansi(
    tokens: Sequence[str], weights: Tensor, *, truecolor: bool = True, separator: str = " "
) -> str:
    """Tokens on shaded backgrounds for a terminal.

    Args:
        tokens: ``N`` token strings.
        weights: ``(N,)`` non-negative attention weights, e.g. a classifier's attention over
            its input tokens.
        truecolor: 24-bit colour codes (most modern terminals); ``False`` uses the 256-colour
            palette.
        separator: put between tokens (outside the shading).

    Returns:
        One line of text; every token is shaded and followed by a reset code.
    """
    labels, levels = _relative_weights(tokens, weights)
    # Black text on every shade: the darkest shade is still light enough to read it.
    foreground = "\x1b[38;2;0;0;0m" if truecolor else "\x1b[38;5;16m"
    parts = []
    for label, level in zip(labels, levels, strict=True):
        r, g, b = _shade(level)
        background = (
            f"\x1b[48;2;{r};{g};{b}m" if truecolor else f"\x1b[48;5;{_ansi_256((r, g, b))}m"
        )
        parts.append(f"{background}{foreground}{_visible(label)}{RESET}")
    return separator.join(parts)


def shade_tokens_html(
    tokens: Sequence[str],
    weights: Tensor,
    *,
    label: str | None = None,
    document: bool = True,
    title: str = "qkv attention",
) -> str:
    """Tokens on shaded backgrounds as HTML; hovering a token shows its weight.

    Args:
        tokens: ``N`` token strings (escaped; they may hold ``<``, ``&``, quotes).
        weights: ``(N,)`` non-negative attention weights.
        label: a caption before the tokens, e.g. the predicted class and its probability.
        document: return a complete self-contained page (no external files, scripts or fonts);
            ``False`` returns one ``<div>`` to combine with others through :func:`html_document`.
        title: the page title when ``document`` is true.

    Returns:
        The HTML text.
    """
    labels, levels = _relative_weights(tokens, weights)
    raw = as_weights(weights, "weights", 1, "(N,)").tolist()
    spans = []
    for text, level, weight in zip(labels, levels, raw, strict=True):
        r, g, b = _shade(level)
        spans.append(
            f'<span class="tok" style="background:rgb({r},{g},{b})" '
            f'title="{weight:.4f}">{html.escape(text)}</span>'
        )
    caption = f'<div class="label">{html.escape(label)}</div>' if label is not None else ""
    fragment = f'<div class="shaded">{caption}<p>{" ".join(spans)}</p></div>'
    return html_document([fragment], title=title) if document else fragment


_PAGE_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 60em; line-height: 2; }
.shaded { margin-bottom: 1.5em; }
.label { font-weight: bold; }
.tok { padding: 0.15em 0.25em; border-radius: 0.2em; }
"""


def html_document(fragments: Sequence[str], *, title: str = "qkv attention") -> str:
    """A self-contained page around fragments from ``shade_tokens_html(..., document=False)``."""
    body = "\n".join(fragments)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"{GENERATOR_META}\n"
        f"<title>{html.escape(title)}</title>\n<style>{_PAGE_STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )
