"""Claimed rows whose message went to RabbitMQ but whose confirm has not come yet.

A publish that times out on a connection still open (RabbitMQ blocked publishers meanwhile, or
is slow) may yet be stored: its bytes can sit in the socket until the alarm ends. The crons keep
such rows claimed and never publish them again while their confirmation may still come; at a
later tick each resolves: confirmed (done, exactly one copy), or failed (its channel or
connection closed: it may or may not have been stored, so it goes again, at least once).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pamqp.commands import Basic


@dataclass
class Resolution:
    """The unconfirmed rows of one claim token, sorted by what became of them."""

    token: str
    confirmed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)


class Unconfirmed:
    """Rows waiting for their confirmation, by claim token (row id -> confirmation)."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, asyncio.Future[Any]]] = {}

    def add(self, token: str, row_id: str, confirmation: asyncio.Future[Any]) -> None:
        self._rows.setdefault(token, {})[row_id] = confirmation

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._rows.values())

    def resolve(self) -> list[Resolution]:
        """What became of every tracked row; confirmed and failed ones are forgotten here, the
        waiting ones stay tracked."""
        resolutions = []
        for token, rows in list(self._rows.items()):
            resolution = Resolution(token)
            for row_id, confirmation in list(rows.items()):
                if not confirmation.done():
                    resolution.waiting.append(row_id)
                    continue
                del rows[row_id]
                kept = _confirmed(confirmation)
                (resolution.confirmed if kept else resolution.failed).append(row_id)
            if not rows:
                del self._rows[token]
            resolutions.append(resolution)
        return resolutions


def _confirmed(confirmation: asyncio.Future[Any]) -> bool:
    """Whether RabbitMQ took the message: acked, not returned as unroutable, nor failed."""
    if confirmation.cancelled() or confirmation.exception() is not None:
        return False
    return isinstance(confirmation.result(), Basic.Ack)
