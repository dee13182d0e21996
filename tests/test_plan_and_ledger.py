"""republish.plan (what becomes of due deliveries) and the pure helpers of the ledger."""

from __future__ import annotations

from datetime import UTC, datetime

from eventbus.delivery.envelope import Envelope, Settlement
from eventbus.delivery.publisher import CONFIRMED, Outcome
from eventbus.errors import FailedPrecondition, Unavailable
from eventbus.jobs.ledger import DueDelivery, columns, merge_settlements
from eventbus.jobs.republish import plan, settle

NOW = 1_700_000_000.0
FAILED_AT = datetime(2024, 1, 1, tzinfo=UTC)


def due(
    delivery_id: str = "d1",
    *,
    attempt: int = 1,
    expires_at: float | None = None,
    queue: str = "orders",
    message_id: str = "m1",
    body: bytes = b"hello",
) -> DueDelivery:
    return DueDelivery(delivery_id, message_id, queue, body, attempt, expires_at, FAILED_AT)


# plan


def test_expired_delivery_is_dropped() -> None:
    result = plan([due(expires_at=NOW - 1)], NOW, max_retries=5)
    assert result.outcomes == {"d1": "expired"}
    assert result.retries == []
    assert result.dead == []


def test_delivery_expiring_exactly_now_counts_as_expired() -> None:
    result = plan([due(expires_at=NOW)], NOW, max_retries=5)
    assert result.outcomes == {"d1": "expired"}


def test_delivery_expiring_later_is_retried() -> None:
    result = plan([due(expires_at=NOW + 0.001)], NOW, max_retries=5)
    assert result.outcomes == {"d1": "retried"}


def test_expiry_wins_over_dead() -> None:
    result = plan([due(attempt=10, expires_at=NOW - 1)], NOW, max_retries=1)
    assert result.outcomes == {"d1": "expired"}
    assert result.dead == []


def test_retry_is_next_attempt_of_the_same_message_to_the_same_queue() -> None:
    result = plan(
        [
            due(
                attempt=2,
                expires_at=NOW + 60,
                queue="q.a",
                message_id="m-7",
                body="héllo ✓".encode(),
            )
        ],
        NOW,
        max_retries=5,
    )
    assert result.outcomes == {"d1": "retried"}
    assert result.retries == [("q.a", Envelope("m-7", "héllo ✓".encode(), 3, NOW + 60))]
    assert result.dead == []


def test_retry_of_message_without_expiry_keeps_no_expiry() -> None:
    result = plan([due(attempt=1)], NOW, max_retries=1)
    [(_, envelope)] = result.retries
    assert envelope.expires_at is None
    assert envelope.attempt == 2


def test_last_allowed_retry_is_still_retried() -> None:
    # max_retries=3 allows deliveries 1..4: the 3rd failed delivery becomes the 4th attempt.
    result = plan([due(attempt=3)], NOW, max_retries=3)
    assert result.outcomes == {"d1": "retried"}
    assert result.retries[0][1].attempt == 4


def test_delivery_after_max_retries_plus_one_attempts_is_dead() -> None:
    delivery = due(attempt=4)
    result = plan([delivery], NOW, max_retries=3)
    assert result.outcomes == {"d1": "dead"}
    assert result.dead == [delivery]
    assert result.retries == []


def test_beyond_max_attempts_is_dead_too() -> None:
    result = plan([due(attempt=9)], NOW, max_retries=3)
    assert result.outcomes == {"d1": "dead"}


def test_max_retries_zero_makes_first_failure_dead() -> None:
    delivery = due(attempt=1)
    result = plan([delivery], NOW, max_retries=0)
    assert result.outcomes == {"d1": "dead"}
    assert result.dead == [delivery]
    assert result.retries == []


def test_empty_batch_plans_nothing() -> None:
    result = plan([], NOW, max_retries=3)
    assert result.outcomes == {}
    assert result.retries == []
    assert result.dead == []


def test_mixed_batch_decides_each_delivery_on_its_own() -> None:
    expired = due("a", expires_at=NOW - 5, queue="q1")
    dead = due("b", attempt=3, queue="q2", message_id="m2")
    retried = due("c", attempt=1, queue="q3", message_id="m3", expires_at=NOW + 5)
    retried_too = due("d", attempt=2, queue="q1", message_id="m4")
    result = plan([expired, dead, retried, retried_too], NOW, max_retries=2)
    assert result.outcomes == {"a": "expired", "b": "dead", "c": "retried", "d": "retried"}
    assert result.dead == [dead]
    assert result.retries == [
        ("q3", Envelope("m3", b"hello", 2, NOW + 5)),
        ("q1", Envelope("m4", b"hello", 3, None)),
    ]


# merge_settlements


def test_ack_after_nack_wins() -> None:
    nack = Settlement("d1", "nack", 1.0)
    ack = Settlement("d1", "ack", 2.0)
    assert merge_settlements([nack, ack]) == [ack]


def test_ack_before_nack_wins() -> None:
    ack = Settlement("d1", "ack", 1.0)
    nack = Settlement("d1", "nack", 2.0)
    assert merge_settlements([ack, nack]) == [ack]


def test_first_of_two_acks_is_kept() -> None:
    first = Settlement("d1", "ack", 1.0)
    assert merge_settlements([first, Settlement("d1", "ack", 2.0)]) == [first]


def test_first_of_two_nacks_is_kept() -> None:
    first = Settlement("d1", "nack", 1.0)
    assert merge_settlements([first, Settlement("d1", "nack", 2.0)]) == [first]


def test_first_ack_kept_after_nack_and_later_acks() -> None:
    ack = Settlement("d1", "ack", 2.0)
    merged = merge_settlements([Settlement("d1", "nack", 1.0), ack, Settlement("d1", "ack", 3.0)])
    assert merged == [ack]


def test_distinct_deliveries_are_all_kept_in_order() -> None:
    settlements = [
        Settlement("d1", "ack", 1.0),
        Settlement("d2", "nack", 2.0),
        Settlement("d3", "ack", 3.0),
    ]
    assert merge_settlements(settlements) == settlements


def test_merge_of_nothing_is_nothing() -> None:
    assert merge_settlements([]) == []


def test_merge_mixed_batch() -> None:
    merged = merge_settlements(
        [
            Settlement("d1", "nack", 1.0),
            Settlement("d2", "ack", 2.0),
            Settlement("d1", "ack", 3.0),
            Settlement("d2", "nack", 4.0),
        ]
    )
    assert merged == [Settlement("d1", "ack", 3.0), Settlement("d2", "ack", 2.0)]


# columns


def test_columns_transposes_rows() -> None:
    rows = [(1, "a", 1.5), (2, "b", 2.5)]
    assert columns(rows, 3) == [[1, 2], ["a", "b"], [1.5, 2.5]]


def test_columns_of_no_rows_gives_width_empty_lists() -> None:
    assert columns([], 6) == [[], [], [], [], [], []]


def test_columns_keeps_only_the_first_width_values() -> None:
    assert columns([(1, 2, 3)], 2) == [[1], [2]]


# settle


def test_settle_turns_a_refused_retry_into_a_dead_letter_and_releases_the_unavailable() -> None:
    ok, refused, later = due("a", message_id="m1"), due("b", message_id="m2"), due("c")
    dead = due("d", attempt=9)
    decided = plan([ok, refused, later, dead], NOW, max_retries=3)
    outcomes = [
        CONFIRMED,
        Outcome("refused", FailedPrecondition("PRECONDITION_FAILED - invalid expiration")),
        Outcome("unavailable", Unavailable("RabbitMQ went away")),
    ]
    settled = settle(decided, outcomes)
    assert settled.outcomes == {"a": "retried", "b": "dead", "d": "dead"}
    assert settled.dead == [
        (dead, None),
        (refused, "RabbitMQ refused its retry: PRECONDITION_FAILED - invalid expiration"),
    ]
    assert settled.released == ["c"] and settled.waiting == "RabbitMQ went away"
    assert settled.republished == ["orders"]
