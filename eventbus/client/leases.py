"""What a subscriber owes its stream: the acks, nacks and deadline extensions not yet sent, and
when each unsettled message's deadline is next to be extended. Pure bookkeeping over plain
times; the subscriber does the waiting and the sending."""

from __future__ import annotations

from itertools import takewhile

from .._generated import v2_pb2

EXTEND_AT = 2 / 3  # of the ack deadline: late enough to be rare, early enough to arrive in time


class Leases:
    """Unsettled messages of one stream, each with the time its deadline is next extended.

    A lease is extended by `deadline` seconds at EXTEND_AT of the deadline, again and again, for
    at most `max_lease` seconds after the message arrived; past that the message is left to run
    out and come back (a handler stuck for that long should not keep it)."""

    def __init__(self, deadline: float, max_lease: float) -> None:
        self.deadline = deadline
        self.max_lease = max_lease
        self._due: dict[str, float] = {}  # in order of due time: every lease has the same length
        self._expiry: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, ack_id: object) -> bool:
        return ack_id in self._due

    def add(self, ack_id: str, now: float) -> None:
        self._due[ack_id] = now + self.deadline * EXTEND_AT
        self._expiry[ack_id] = now + self.max_lease

    def remove(self, ack_id: str) -> None:
        self._due.pop(ack_id, None)
        self._expiry.pop(ack_id, None)

    def next_due(self) -> float | None:
        """When the earliest lease is due for extension; None when there are none."""
        return next(iter(self._due.values()), None)

    def take_due(self, now: float) -> list[str]:
        """The ack ids to extend now; each is due again EXTEND_AT of a deadline later, or is
        dropped once its maximum lease has passed."""
        due = list(takewhile(lambda ack_id: self._due[ack_id] <= now, self._due))
        extend = []
        for ack_id in due:
            if self._expiry[ack_id] <= now:
                self.remove(ack_id)
                continue
            del self._due[ack_id]
            self._due[ack_id] = now + self.deadline * EXTEND_AT
            extend.append(ack_id)
        return extend


class Pending:
    """Acks, nacks and deadline extensions waiting to be sent on the stream."""

    def __init__(self) -> None:
        self.acks: list[str] = []
        self.nacks: list[str] = []
        self.extensions: list[str] = []

    def __len__(self) -> int:
        return len(self.acks) + len(self.nacks) + len(self.extensions)

    def take(self, deadline_seconds: int) -> v2_pb2.StreamingPullRequest | None:
        """One request carrying everything pending (an extension for a message settled in the
        same request is left out); None when nothing is."""
        if not self:
            return None
        settled = set(self.acks) | set(self.nacks)
        extensions = [ack_id for ack_id in self.extensions if ack_id not in settled]
        request = v2_pb2.StreamingPullRequest(
            ack_ids=self.acks,
            nack_ids=self.nacks,
            modify_deadline_ack_ids=extensions,
            modify_deadline_seconds=[deadline_seconds] if extensions else [],
        )
        self.acks, self.nacks, self.extensions = [], [], []
        return request
