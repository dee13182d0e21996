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


@dataclass(frozen=True)
class Sent:
    confirmation: asyncio.Future[Any]
    generation: int  # the broker connection it was sent on


class Unconfirmed:
    """Rows waiting for their confirmation, by claim token."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, Sent]] = {}

    def add(
        self, token: str, row_id: str, confirmation: asyncio.Future[Any], generation: int
    ) -> None:
        self._rows.setdefault(token, {})[row_id] = Sent(confirmation, generation)

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._rows.values())

    def resolve(self, generation: int) -> list[Resolution]:
        """What became of every tracked row. One sent on an older connection than generation
        counts as failed even when its confirmation never resolved: that connection is gone.
        Rows stay tracked until forgotten, once what became of them is recorded."""
        resolutions = []
        for token, rows in self._rows.items():
            resolution = Resolution(token)
            for row_id, sent in rows.items():
                if sent.confirmation.done():
                    confirmed = _confirmed(sent.confirmation)
                    (resolution.confirmed if confirmed else resolution.failed).append(row_id)
                elif sent.generation != generation:
                    resolution.failed.append(row_id)
                else:
                    resolution.waiting.append(row_id)
            resolutions.append(resolution)
        return resolutions

    def forget(self, token: str, row_ids: list[str]) -> None:
        rows = self._rows.get(token, {})
        for row_id in row_ids:
            rows.pop(row_id, None)
        if not rows:
            self._rows.pop(token, None)


def _confirmed(confirmation: asyncio.Future[Any]) -> bool:
    """Whether RabbitMQ took the message: acked, not returned as unroutable, nor failed."""
    if confirmation.cancelled() or confirmation.exception() is not None:
        return False
    return isinstance(confirmation.result(), Basic.Ack)
