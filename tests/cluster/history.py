"""What a workload saw, message by message: every publish attempt and its answer, every
delivery and every ack, on one clock (seconds since the run began), plus when each fault step
began and ended. The checker reads it; nothing here talks to a server."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

OK = "OK"


@dataclass
class Message:
    """One message id: the API it went through and what became of it."""

    api: str  # "v1" or "v2"
    attempts: list[tuple[float, str]] = field(default_factory=list)  # (when, OK or an error)
    deliveries: list[float] = field(default_factory=list)
    acks: int = 0

    @property
    def confirmed_at(self) -> float | None:
        """When a publish of it was first answered OK, or None."""
        return next((when for when, outcome in self.attempts if outcome == OK), None)

    @property
    def failed_attempts(self) -> int:
        return sum(outcome != OK for _, outcome in self.attempts)


@dataclass(frozen=True)
class Mark:
    """A fault step: what it did, when it began and when it returned."""

    name: str
    began: float
    ended: float


class History:
    """The record of one run. Times are seconds since the History was made."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.messages: dict[str, Message] = {}
        self.unexpected: Counter[str] = Counter()  # delivered ids nobody published
        self.marks: list[Mark] = []
        self.load_ended = 0.0  # publishers stopped starting new messages
        self.publish_ended = 0.0  # the last publish retry ended
        self.drain_ended = 0.0

    def now(self) -> float:
        return time.monotonic() - self.started

    def sending(self, message_id: str, api: str) -> None:
        """A first publish of message_id is about to be sent (it may be delivered before its
        answer arrives)."""
        self.messages.setdefault(message_id, Message(api))

    def attempted(self, message_id: str, api: str, outcome: str) -> None:
        """A publish of message_id was answered with outcome (OK or the error's name)."""
        message = self.messages.setdefault(message_id, Message(api))
        message.attempts.append((self.now(), outcome))

    def delivered(self, message_id: str) -> None:
        message = self.messages.get(message_id)
        if message is None:
            self.unexpected[message_id] += 1
        else:
            message.deliveries.append(self.now())

    def acked(self, message_id: str) -> None:
        message = self.messages.get(message_id)
        if message is not None:
            message.acks += 1

    def mark(self, name: str, began: float, ended: float) -> None:
        self.marks.append(Mark(name, began, ended))

    def delivery_count(self) -> int:
        return sum(len(m.deliveries) for m in self.messages.values())

    def last_delivery(self) -> float:
        return max((m.deliveries[-1] for m in self.messages.values() if m.deliveries), default=0)

    def undelivered_confirmed(self) -> int:
        """Confirmed messages not delivered yet."""
        return sum(
            1 for m in self.messages.values() if m.confirmed_at is not None and not m.deliveries
        )
