"""The checker: from a History, what was lost, duplicated or unexpected, and a table of counts.

lost: confirmed (a publish answered OK) but never delivered once the run drained; every lost
message is an OK-then-lost, and those confirmed while a fault was in force are counted apart.
duplicated: delivered more than once (at-least-once delivery allows it; it is counted, not
failed). unexpected: delivered but never published by the run. A message whose every publish
attempt was answered with an error ("gave up") may or may not have been stored: delivered or
not, it is neither lost nor unexpected.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

from grpclib.const import Status

from tests.cluster.history import OK, History, Message

APIS = ("v1", "v2")
ALLOWED_STATUSES = {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}


@dataclass
class Counts:
    """The counts of one API (or of all)."""

    attempted: int = 0  # message ids with at least one publish attempt
    attempts: int = 0  # publish attempts (a retry is one more)
    confirmed: int = 0
    failed_attempts: int = 0  # attempts answered with an error
    gave_up: int = 0  # ids never confirmed
    gave_up_delivered: int = 0  # of those, delivered anyway (stored despite the error)
    delivered: int = 0  # ids delivered at least once
    deliveries: int = 0
    duplicated: int = 0  # ids delivered more than once
    retried_duplicated: int = 0  # of those, ids published more than once (a client retry)
    acked: int = 0  # ids whose ack was answered OK (v1) or sent on the stream (v2)
    lost: int = 0
    lost_in_fault: int = 0  # lost and confirmed while a fault step was in force

    def add(self, message: Message, in_fault: bool) -> None:
        confirmed = message.confirmed_at is not None
        delivered = len(message.deliveries)
        self.attempted += 1
        self.attempts += len(message.attempts)
        self.failed_attempts += message.failed_attempts
        self.confirmed += confirmed
        self.gave_up += not confirmed
        self.gave_up_delivered += not confirmed and delivered > 0
        self.delivered += delivered > 0
        self.deliveries += delivered
        self.duplicated += delivered > 1
        self.retried_duplicated += delivered > 1 and len(message.attempts) > 1
        self.acked += message.acks > 0
        self.lost += confirmed and delivered == 0
        self.lost_in_fault += confirmed and delivered == 0 and in_fault


@dataclass
class Report:
    """The checker's verdict on one run."""

    title: str
    counts: dict[str, Counts]  # per API and "all"
    unexpected: int
    lost_ids: list[str]
    outcomes_in_fault: Counter[str]  # publish answers while a fault was in force
    outage: dict[str, float]  # per API: longest time without a confirmed publish
    errors: Counter[str]  # every publish error answer of the run, "API ANSWER"
    wrong: Counter[str]  # of those, statuses an outage must not give (INTERNAL, NOT_FOUND...)
    notes: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.counts["all"].lost

    @property
    def duplicated(self) -> int:
        return self.counts["all"].duplicated

    def table(self) -> str:
        return render(self)


def check(history: History, title: str) -> Report:
    """The verdict on history: counts per API, lost ids, answers during the faults."""
    window = fault_window(history)
    counts = {api: Counts() for api in (*APIS, "all")}
    lost_ids = []
    for message_id, message in history.messages.items():
        confirmed_at = message.confirmed_at
        in_fault = window is not None and confirmed_at is not None and inside(confirmed_at, window)
        counts[message.api].add(message, in_fault)
        counts["all"].add(message, in_fault)
        if confirmed_at is not None and not message.deliveries:
            lost_ids.append(message_id)
    return Report(
        title,
        counts,
        sum(history.unexpected.values()),
        sorted(lost_ids),
        answers_within(history, window),
        {api: longest_outage(history, api) for api in APIS},
        error_answers(history),
        wrong_statuses(history),
    )


def fault_window(history: History) -> tuple[float, float] | None:
    """From the first fault step's start to the last one's end."""
    if not history.marks:
        return None
    return min(m.began for m in history.marks), max(m.ended for m in history.marks)


def inside(when: float, window: tuple[float, float]) -> bool:
    return window[0] <= when <= window[1]


def answers_within(history: History, window: tuple[float, float] | None) -> Counter[str]:
    """How the publish attempts made inside window were answered, as "API ANSWER" (OK or the
    error); a v2 batch counts once per message."""
    answers: Counter[str] = Counter()
    if window is None:
        return answers
    for message in history.messages.values():
        answers.update(
            f"{message.api} {outcome}" for when, outcome in message.attempts if inside(when, window)
        )
    return answers


def error_answers(history: History) -> Counter[str]:
    """Every publish error answer of the run, as "API ANSWER"."""
    return Counter(
        f"{message.api} {outcome}"
        for message in history.messages.values()
        for _, outcome in message.attempts
        if outcome != OK
    )


def wrong_statuses(history: History) -> Counter[str]:
    """Publish answers with a gRPC status a dependency outage must not give: anything but OK,
    UNAVAILABLE and DEADLINE_EXCEEDED (INTERNAL and UNKNOWN mean a bug; transport errors of a
    killed daemon and client timeouts are not statuses and are allowed)."""
    return Counter(
        {
            answer: n
            for answer, n in error_answers(history).items()
            if answer.split()[1] in Status.__members__ and answer.split()[1] not in ALLOWED_STATUSES
        }
    )


def longest_outage(history: History, api: str) -> float:
    """The longest time, while publishers were running, without a publish of api answered OK."""
    times = sorted(
        when
        for message in history.messages.values()
        if message.api == api
        for when, outcome in message.attempts
        if outcome == OK
    )
    edges = [0.0, *times, history.load_ended]
    return max((b - a for a, b in itertools.pairwise(edges)), default=0.0)


COLUMNS = (
    ("attempted", "ids"),
    ("confirmed", "OK"),
    ("failed_attempts", "err-answers"),
    ("gave_up", "gave-up"),
    ("gave_up_delivered", "gave-up-deliv"),
    ("delivered", "delivered"),
    ("duplicated", "dup-ids"),
    ("retried_duplicated", "dup-by-retry"),
    ("deliveries", "deliveries"),
    ("acked", "acked"),
    ("lost", "LOST"),
    ("lost_in_fault", "OK-then-lost-in-fault"),
)


def render(report: Report) -> str:
    """The report as a fixed-width table with its notes under it."""
    head = ["api", *(label for _, label in COLUMNS)]
    rows = [
        [api, *(str(getattr(report.counts[api], name)) for name, _ in COLUMNS)]
        for api in (
            *APIS,
            "all",
        )
    ]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = [f"== {report.title}"]
    lines += [
        "  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
        for row in [head, *rows]
    ]
    answers = ", ".join(f"{name} {n}" for name, n in report.outcomes_in_fault.most_common())
    lines.append(f"  unexpected deliveries: {report.unexpected}")
    lines.append(f"  publish answers during the faults: {answers or '-'}")
    errors = ", ".join(f"{name} {n}" for name, n in report.errors.most_common())
    lines.append(f"  publish errors of the run: {errors or '-'}")
    if report.wrong:
        lines.append(
            f"  WRONG STATUSES (a bug, or a status outside the contract): {dict(report.wrong)}"
        )
    outage = ", ".join(f"{api} {seconds:.1f} s" for api, seconds in report.outage.items())
    lines.append(f"  longest time without a confirmed publish: {outage}")
    if report.lost_ids:
        lines.append(f"  lost ids (first 10): {', '.join(report.lost_ids[:10])}")
    lines += [f"  {note}" for note in report.notes]
    return "\n".join(lines)
