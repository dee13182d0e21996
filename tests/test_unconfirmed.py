"""Rows whose message was sent but not confirmed: held until their confirmation resolves."""

from __future__ import annotations

import asyncio

from pamqp.commands import Basic

from eventbus.delivery.publisher import CONFIRMED, Outcome
from eventbus.errors import Unavailable
from eventbus.jobs.republish import Plan, settle
from eventbus.jobs.unconfirmed import Resolution, Unconfirmed
from tests.test_plan_and_ledger import due as due_delivery


def test_confirmed_failed_and_waiting_rows_are_told_apart() -> None:
    loop = asyncio.new_event_loop()
    try:
        acked, returned, closed, waiting, old = (loop.create_future() for _ in range(5))
        unconfirmed = Unconfirmed()
        for row, confirmation in (("a", acked), ("r", returned), ("c", closed), ("w", waiting)):
            unconfirmed.add("t1", row, confirmation, generation=2)
        unconfirmed.add("t2", "o", old, generation=1)  # sent on a connection since replaced
        assert unconfirmed.resolve(2) == [
            Resolution("t1", waiting=["a", "r", "c", "w"]),
            Resolution("t2", failed=["o"]),
        ]
        unconfirmed.forget("t2", ["o"])
        acked.set_result(Basic.Ack())
        returned.set_result(object())  # the message itself: returned as unroutable
        closed.set_exception(ConnectionError("closed"))
        resolved = Resolution("t1", confirmed=["a"], failed=["r", "c"], waiting=["w"])
        assert unconfirmed.resolve(2) == [resolved]
        assert unconfirmed.resolve(2) == [resolved]  # kept until what became of them is stored
        unconfirmed.forget("t1", ["a", "r", "c"])
        assert len(unconfirmed) == 1
        waiting.set_result(Basic.Ack())
        assert unconfirmed.resolve(2) == [Resolution("t1", confirmed=["w"])]
        unconfirmed.forget("t1", ["w"])
        assert (len(unconfirmed), unconfirmed.resolve(2)) == (0, [])
    finally:
        loop.close()


def test_a_retry_sent_but_not_confirmed_is_neither_done_nor_released() -> None:
    loop = asyncio.new_event_loop()
    try:
        first, second = due_delivery("d1"), due_delivery("d2")
        decided = Plan(
            outcomes={"d1": "retried", "d2": "retried"}, retried=[first, second], retries=[]
        )
        confirmation = loop.create_future()
        stuck = Outcome("unavailable", Unavailable("not confirmed in 5 s"), confirmation)
        settled = settle(decided, [CONFIRMED, stuck])
        assert settled.outcomes == {"d1": "retried"}
        assert (settled.released, settled.unconfirmed) == ([], [("d2", confirmation)])
    finally:
        loop.close()
