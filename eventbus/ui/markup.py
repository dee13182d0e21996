"""HTML built from Python without a template engine: every value is escaped unless it is Html
already, so a queue name or a message body can never become markup. Also the small formats the
pages share (counts, rates, ages, body previews) and the inline SVG charts."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from urllib.parse import urlencode

PREVIEW_CHARACTERS = 120


class Html(str):
    """Text that is HTML already: put into a page as it is. Adding to it escapes what is
    added unless that is Html too (other str methods return plain, untrusted str)."""

    __slots__ = ()

    def __add__(self, other: str) -> Html:
        return Html(str.__add__(self, esc(other)))


def esc(value: object) -> Html:
    """value as HTML text: escaped, quotes too, unless it is Html already."""
    return value if isinstance(value, Html) else Html(html.escape(str(value), quote=True))


def fill(template: str, **values: object) -> Html:
    """template with each {name} replaced by its value, escaped unless Html."""
    return Html(template.format_map({key: esc(value) for key, value in values.items()}))


def join(parts: Iterable[object], separator: str = "") -> Html:
    return Html(separator.join(esc(part) for part in parts))


def link(path: str, **query: object) -> str:
    """A URL of the page at path with query parameters, percent-encoded."""
    return f"{path}?{urlencode({k: str(v) for k, v in query.items()})}" if query else path


# ---- Formats ------------------------------------------------------------------------------


def count(value: int | float | None) -> str:
    return "—" if value is None else f"{int(value):,}"


def rate(value: float | None) -> str:
    """Messages a second, short."""
    if value is None or math.isnan(value):
        return "—"
    if value == 0:
        return "0/s"
    if value < 10:
        return f"{value:.1f}/s"
    return f"{value:,.0f}/s"


def age(seconds: float | None) -> str:
    """A duration as its two largest units: 45s, 3m 05s, 2h 10m, 4d 3h."""
    if seconds is None:
        return "—"
    whole = max(int(seconds), 0)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def moment(when: datetime, now: datetime | None = None) -> str:
    """A time as UTC, to the second, with how far it is from now."""
    now = now or datetime.now(UTC)
    delta = (when - now).total_seconds()
    relative = f"in {age(delta)}" if delta >= 0 else f"{age(-delta)} ago"
    return f"{when.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({relative})"


def preview(body: bytes, size: int | None = None, limit: int = PREVIEW_CHARACTERS) -> str:
    """The start of a message body as text (cut at limit characters); a body that is not
    UTF-8 as its length and first bytes in hex. body may be the start of a longer body of
    size bytes (a character split where it was cut is left out)."""
    size = len(body) if size is None else size
    try:
        text = body.decode()
    except UnicodeDecodeError as error:
        split = size > len(body) and error.reason == "unexpected end of data"
        if not split:
            return f"(binary, {size:,} bytes) {body[:24].hex(' ')}" + (" …" if size > 24 else "")
        text = body[: error.start].decode()
    shown = " ".join(text[: limit * 2].split())  # newlines and runs of blanks as one space
    if len(shown) > limit or len(text) > limit * 2 or size > len(body):
        return f"{shown[:limit]}… ({size:,} bytes)"
    return shown


# ---- Charts -------------------------------------------------------------------------------


def path(values: Sequence[float], top: float, width: float, height: float) -> str:
    """An SVG path drawing values (NaN: a gap) from left to right, top at the upper edge."""
    top = top if top > 0 else 1.0
    step = width / max(len(values) - 1, 1)
    parts: list[str] = []
    pen_down = False
    for index, value in enumerate(values):
        if math.isnan(value):
            pen_down = False
            continue
        x = index * step
        y = height - 1 - (min(value, top) / top) * (height - 2)
        parts.append(f"{'L' if pen_down else 'M'}{x:.1f} {y:.1f}")
        pen_down = True
    return "".join(parts)


def highest(series: Mapping[str, Sequence[float]]) -> float:
    values = [v for s in series.values() for v in s if not math.isnan(v)]
    return max(values, default=0.0)


def chart(title: str, values: Sequence[float], series: str, every: float, width: int = 600) -> Html:
    """One series over the window with its scale: the larger chart of a queue page."""
    height = 120
    top = highest({series: values})
    scale = nice(top)
    minutes = round(len(values) * every / 60)
    return fill(
        '<figure class="chart"><figcaption>{title} <span class="muted">now {now}, peak '
        "{peak}</span></figcaption>"
        '<svg viewBox="0 0 {w} {h}" preserveAspectRatio="none" role="img" '
        'aria-label="{title} over the last {minutes} minutes">'
        '<line class="grid" x1="0" y1="1" x2="{w}" y2="1"/>'
        '<line class="grid" x1="0" y1="{mid}" x2="{w}" y2="{mid}"/>'
        '<line class="axis" x1="0" y1="{h1}" x2="{w}" y2="{h1}"/>'
        '<path class="s-{series} wide" d="{d}"/></svg>'
        '<div class="axis-labels"><span>{minutes} min ago</span><span>scale {scale}</span>'
        "<span>now</span></div></figure>",
        title=title,
        now=rate(next((v for v in reversed(values) if not math.isnan(v)), None)),
        peak=rate(top),
        w=width,
        h=height,
        mid=height / 2,
        h1=height - 1,
        minutes=minutes,
        series=series,
        d=path(values, scale, width, height),
        scale=rate(scale),
    )


def nice(value: float) -> float:
    """The smallest of 1, 2 or 5 times 10^n at or above value (1 for nothing)."""
    if value <= 0 or math.isnan(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for factor in (1, 2, 5, 10):
        if value <= factor * power:
            return float(factor * power)
    return float(10 * power)
