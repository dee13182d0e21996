"""The screen of `eventbus top`: a header with the node's health, a table of queues, a footer.
Plain functions from what was read to rich renderables."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .sampling import DEPENDENCIES, QueueCounts, Rates, Reading

COUNT_COLUMNS = ("Ready", "In flight", "Delayed", "Dead", "Consumers")
RATE_COLUMNS = ("Publish/s", "Deliver/s", "Ack/s")
CHROME_LINES = 9  # header, health, table borders and heading, total, footer


@dataclass(frozen=True)
class Frame:
    """Everything one screen shows."""

    server: str
    http: str | None
    reading: Reading
    rates: Rates | None  # None: not known yet (one reading so far, or the node restarted)
    at: datetime
    interval: float
    height: int = 40


def render(frame: Frame) -> RenderableType:
    return Group(_title(frame), _health(frame), Text(""), _queues(frame), Text(""), _footer(frame))


def uptime(seconds: float) -> str:
    """1d 02:03:04, or 02:03:04 under a day."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def _title(frame: Frame) -> Text:
    stats = frame.reading.stats
    title = Text("eventbus top", style="bold", no_wrap=True, overflow="ellipsis")
    if stats is not None:
        title.append(f"  node {stats.node}  v{stats.version}  up {uptime(stats.uptime)}")
    where = frame.server + (f"  http {frame.http}" if frame.http else "")
    title.append(f"  {where}", style="dim")
    title.append(f"  {frame.at:%H:%M:%S}")
    return title


def _health(frame: Frame) -> Text:
    reading = frame.reading
    if frame.http is None:
        return Text("node health, version, uptime and rates: give --http HOST:PORT", style="dim")
    if reading.readiness is None:
        return Text(f"HTTP: {reading.http_error}", style="bold red")
    readiness = reading.readiness
    line = Text("READY" if readiness.ready else "NOT READY", style="bold green", no_wrap=True)
    if not readiness.ready:
        line.stylize("bold red")
    for name in DEPENDENCIES:
        line.append(f"  {name} ")
        if name in readiness.down:
            line.append(f"down ({readiness.down[name]})", style="red")
        elif name in readiness.degraded:
            line.append(f"degraded ({readiness.degraded[name]})", style="yellow")
        else:
            line.append("up", style="green")
    if reading.stats is not None and reading.stats.peers:
        line.append(f"  nodes: {', '.join(reading.stats.peers)}", style="dim")
    return line


def _queues(frame: Frame) -> RenderableType:
    reading = frame.reading
    if reading.queues is None:
        return Text(f"queues: {reading.queues_error}", style="bold red")
    table = Table(expand=False, show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("Queue", no_wrap=True, max_width=48)
    for heading in (*COUNT_COLUMNS, *RATE_COLUMNS):
        table.add_column(heading, justify="right")
    room = max(frame.height - CHROME_LINES, 1)
    shown = reading.queues if len(reading.queues) <= room else reading.queues[: room - 1]
    for counts in shown:
        table.add_row(counts.name, *_count_cells(counts), *_rate_cells(frame, counts.name))
    if len(shown) < len(reading.queues):
        table.add_row(f"... {len(reading.queues) - len(shown)} more", style="dim")
    table.add_section()
    table.add_row("total", *_total_cells(frame), style="bold")
    return table


def _count_cells(counts: QueueCounts) -> list[str]:
    values = (counts.ready, counts.in_flight, counts.delayed, counts.dead_letters)
    return [*(str(value) for value in values), str(counts.consumers)]


def _rate_cells(frame: Frame, queue: str) -> list[str]:
    if frame.http is None:
        return ["", "", ""]
    if frame.rates is None:
        return ["-", "-", "-"]
    found = frame.rates.get(queue, {})  # none: no traffic through this node
    return [f"{found.get(column, 0.0):.1f}" for column in ("publish", "deliver", "ack")]


def _total_cells(frame: Frame) -> list[str]:
    queues = frame.reading.queues or []
    sums = [
        sum(q.ready for q in queues),
        sum(q.in_flight for q in queues),
        sum(q.delayed for q in queues),
        sum(q.dead_letters for q in queues),
        sum(q.consumers for q in queues),
    ]
    cells = [str(value) for value in sums]
    if frame.http is None:
        return [*cells, "", "", ""]
    if frame.rates is None:
        return [*cells, "-", "-", "-"]
    shown = {q.name for q in queues}
    rates = [r for queue, r in frame.rates.items() if queue in shown]
    columns = ("publish", "deliver", "ack")
    return [*cells, *(f"{sum(r.get(c, 0.0) for r in rates):.1f}" for c in columns)]


def _footer(frame: Frame) -> Text:
    note = "q quit" + f"  refresh {frame.interval:g} s"
    if frame.http is not None:
        note += "  rates: this node's /stats counters"
    return Text(note, style="dim")
