"""The gate's cap on calls in flight and how it names the end of a cancelled call."""

from __future__ import annotations

from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.metadata import Deadline

from eventbus.api.rpc import Gate, _cancelled_code
from eventbus.ops.metrics import Metrics


class CallWithDeadline:
    """What _cancelled_code reads of a grpclib server stream: its deadline."""

    def __init__(self, seconds_left: float | None) -> None:
        self.deadline = None if seconds_left is None else Deadline.from_timeout(seconds_left)


async def test_calls_past_the_cap_are_refused_unread() -> None:
    metrics = Metrics("n")
    gate = Gate(metrics, max_calls=2)
    gate._enter()
    gate._enter()

    async def never(_: Any) -> None:
        raise AssertionError("work ran")

    with pytest.raises(GRPCError) as refused:
        await gate.unary(None, "mq.Mq/publish", never)  # type: ignore[arg-type]
    assert refused.value.status == Status.RESOURCE_EXHAUSTED
    assert "server.max_concurrent_calls" in (refused.value.message or "")
    labels = {"method": "mq.Mq/publish", "code": "RESOURCE_EXHAUSTED"}
    assert metrics.registry.get_sample_value("eventbus_grpc_requests_total", labels) == 1
    assert gate.in_flight == 2


@pytest.mark.parametrize(
    ("seconds_left", "code"),
    [
        (None, Status.CANCELLED),
        (5.0, Status.CANCELLED),
        (0.05, Status.DEADLINE_EXCEEDED),  # the client's own timer fired a transit earlier
        (-1.0, Status.DEADLINE_EXCEEDED),
    ],
)
def test_a_cancelled_call_is_named_by_its_deadline(
    seconds_left: float | None, code: Status
) -> None:
    assert _cancelled_code(CallWithDeadline(seconds_left)) == code  # type: ignore[arg-type]
