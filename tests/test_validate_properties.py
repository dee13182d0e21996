"""Property-based checks: whatever a client sends, validation either refuses it with
InvalidArgument or lets through only what the engines below accept (pamqp marshals the name,
RabbitMQ takes the expiration, the delay fits the configured maximum)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pamqp.commands import Basic, Exchange, Queue

from eventbus.delivery import validate
from eventbus.delivery.envelope import new_envelope
from eventbus.errors import InvalidArgument

NOW = 1_700_000_000.0
RABBITMQ_MAX_EXPIRATION_MS = 315_360_000_000  # found by bisecting what RabbitMQ 3.10 accepts
UINT64 = st.integers(min_value=0, max_value=2**64 - 1)
NAMES = st.one_of(
    st.text(max_size=300),
    st.text(alphabet="abc.-_:@#,/+ \n\t\x00é", max_size=300),
    st.from_regex(r"[A-Za-z0-9.]{1,260}", fullmatch=True),
)


def _accepted_name(value: str) -> str | None:
    try:
        return validate.name("queue", value, "event_bus")
    except InvalidArgument as error:
        assert error.message.startswith("queue ")
        return None


@given(NAMES)
def test_an_accepted_name_is_one_pamqp_marshals_as_queue_exchange_and_routing_key(
    value: str,
) -> None:
    accepted = _accepted_name(value)
    if accepted is None:
        return
    assert 1 <= len(accepted.encode()) <= validate.MAX_NAME_BYTES
    Queue.Declare(queue=accepted, durable=True).validate()
    Exchange.Declare(exchange=accepted, exchange_type="topic").validate()
    Basic.Publish(exchange=accepted, routing_key=accepted).validate()
    assert "\n" not in accepted and not accepted.startswith("amq.")


@given(UINT64)
def test_an_accepted_ttl_gives_an_expiration_rabbitmq_accepts(seconds: int) -> None:
    try:
        validate.ttl(seconds)
    except InvalidArgument:
        assert seconds > validate.MAX_TTL_SECONDS
        return
    properties = new_envelope(b"x", seconds, NOW).to_amqp(NOW).properties
    if seconds == 0:
        assert properties.expiration is None
    else:
        assert 1 <= int(properties.expiration) <= RABBITMQ_MAX_EXPIRATION_MS


@given(UINT64, st.integers(min_value=1, max_value=10 * 365 * 86400))
def test_an_accepted_delay_is_within_the_configured_maximum(seconds: int, maximum: int) -> None:
    try:
        assert validate.delay(seconds, maximum) == seconds <= maximum
    except InvalidArgument:
        assert seconds > maximum
