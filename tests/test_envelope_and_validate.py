"""Envelopes and bookkeeping records as plain data, and the checks on what clients send."""

from __future__ import annotations

import uuid
from typing import Any, cast

import aio_pika
import aio_pika.abc
import pytest

from eventbus.delivery import validate
from eventbus.delivery.envelope import (
    ATTEMPT_HEADER,
    EXPIRES_AT_HEADER,
    DelayedMessage,
    DeliveryRecord,
    Envelope,
    Outgoing,
    Settlement,
    decode_settlement,
    internal_message,
    new_envelope,
)
from eventbus.errors import InvalidArgument

NOW = 1_700_000_000.0
M1, M2 = str(uuid.uuid4()), str(uuid.uuid4())


class FakeIncoming:
    """What Envelope.from_amqp reads of an incoming AMQP message."""

    def __init__(self, body: bytes, headers: dict[str, Any] | None, message_id: str | None) -> None:
        self.body = body
        self.headers = headers
        self.message_id = message_id
        self.timestamp = None


def incoming(body: bytes, headers: dict[str, Any] | None, message_id: str | None) -> Envelope:
    message = FakeIncoming(body, headers, message_id)
    return Envelope.from_amqp(cast(aio_pika.abc.AbstractIncomingMessage, message))


def received(message: Outgoing) -> Envelope:
    """The envelope a consumer reads back from what to_amqp wrote."""
    return incoming(message.body, message.properties.headers, message.properties.message_id)


# Envelope.to_amqp


def test_to_amqp_is_persistent_with_message_id_and_body() -> None:
    message = Envelope(M1, "héllo".encode(), 1, None).to_amqp(NOW)
    assert message.properties.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.properties.message_id == M1
    assert message.body == "héllo".encode()


def test_to_amqp_headers_carry_attempt_and_expiry_in_milliseconds() -> None:
    message = Envelope(M1, b"x", 3, NOW + 90.5).to_amqp(NOW)
    assert message.properties.headers == {
        ATTEMPT_HEADER: 3,
        EXPIRES_AT_HEADER: int((NOW + 90.5) * 1000),
    }


def test_to_amqp_expiration_is_the_remaining_time_in_milliseconds() -> None:
    message = Envelope(M1, b"x", 1, NOW + 90.5).to_amqp(NOW)
    assert message.properties.expiration == "90500"


def test_to_amqp_without_expiry_has_no_expiration_or_expiry_header() -> None:
    message = Envelope(M1, b"x", 2, None).to_amqp(NOW)
    assert message.properties.expiration is None
    assert message.properties.headers == {ATTEMPT_HEADER: 2}


def test_to_amqp_of_a_first_attempt_without_expiry_has_no_headers() -> None:
    message = Envelope(M1, b"x", 1, None).to_amqp(NOW)
    assert message.properties.headers is None
    assert received(message) == Envelope(M1, b"x", 1, None)


def test_to_amqp_of_an_already_expired_envelope_expires_at_once_not_never() -> None:
    message = Envelope(M1, b"x", 1, NOW - 10).to_amqp(NOW)
    assert message.properties.expiration == "1"


def test_to_amqp_properties_encode_as_an_amqp_content_header() -> None:
    from pamqp.header import ContentHeader

    message = Envelope(M1, b"x", 3, NOW + 5).to_amqp(NOW)
    encoded = ContentHeader(0, len(message.body), message.properties).marshal()
    decoded = ContentHeader()
    decoded.unmarshal(encoded)
    assert decoded.properties.headers == message.properties.headers
    assert decoded.properties.expiration == "5000"


# Envelope.from_amqp


def test_round_trip_through_amqp_keeps_everything() -> None:
    envelope = Envelope(M1, "body ✓ ünïcode".encode(), 4, NOW + 30)
    assert received(envelope.to_amqp(NOW)) == envelope


def test_round_trip_without_expiry() -> None:
    envelope = Envelope(M2, b"plain", 2, None)
    assert received(envelope.to_amqp(NOW)) == envelope


def test_round_trip_keeps_expiry_to_the_millisecond() -> None:
    envelope = Envelope(M1, b"x", 1, NOW + 1.2345)
    back = received(envelope.to_amqp(NOW))
    assert back.expires_at == pytest.approx(NOW + 1.234, abs=1e-6)


def test_message_without_headers_is_first_attempt_without_expiry() -> None:
    envelope = incoming(b"from elsewhere", None, M1)
    assert envelope == Envelope(M1, b"from elsewhere", 1, None)


def test_message_with_empty_headers_is_first_attempt_without_expiry() -> None:
    envelope = incoming(b"x", {}, "m-9")
    assert envelope.attempt == 1
    assert envelope.expires_at is None


def test_message_without_id_gets_a_fresh_uuid() -> None:
    first = incoming(b"x", None, None)
    second = incoming(b"x", None, None)
    assert str(uuid.UUID(first.message_id)) == first.message_id
    assert first.message_id != second.message_id


def test_non_utf8_body_is_kept_as_it_is() -> None:
    envelope = incoming(b"ok \xff\xfe end", None, M1)
    assert envelope.body == b"ok \xff\xfe end"


def test_headers_of_the_wrong_type_are_ignored() -> None:
    envelope = incoming(b"x", {ATTEMPT_HEADER: "3", EXPIRES_AT_HEADER: "123"}, M1)
    assert envelope.attempt == 1
    assert envelope.expires_at is None


# Envelope.expired


def test_envelope_without_expiry_never_expires() -> None:
    assert not Envelope("m", b"x").expired(1e18)


def test_envelope_expires_exactly_at_its_expiry() -> None:
    envelope = Envelope("m", b"x", 1, NOW)
    assert not envelope.expired(NOW - 0.001)
    assert envelope.expired(NOW)
    assert envelope.expired(NOW + 0.001)


# new_envelope


def test_new_envelope_with_ttl_zero_never_expires() -> None:
    envelope = new_envelope(b"hi", 0, NOW)
    assert envelope.expires_at is None
    assert envelope.attempt == 1
    assert envelope.body == b"hi"


def test_new_envelope_with_ttl_expires_ttl_seconds_from_now() -> None:
    envelope = new_envelope(b"hi", 60, NOW)
    assert envelope.expires_at == NOW + 60
    assert envelope.attempt == 1


def test_new_envelopes_get_distinct_uuid_message_ids() -> None:
    first, second = new_envelope(b"a", 0, NOW), new_envelope(b"a", 0, NOW)
    assert uuid.UUID(first.message_id) != uuid.UUID(second.message_id)


# DeliveryRecord and Settlement


def test_delivery_record_round_trip_with_non_ascii_body() -> None:
    record = DeliveryRecord(
        str(uuid.uuid4()),
        str(uuid.uuid4()),
        "kö",
        '日本語 ✓ "quoted"'.encode(),
        2,
        NOW,
        NOW + 30,
        NOW + 60,
    )
    assert DeliveryRecord.decode(record.encode()) == record


def test_delivery_record_round_trip_without_expiry() -> None:
    record = DeliveryRecord("d", "m", "q", b"b", 1, NOW, NOW + 30, None)
    assert DeliveryRecord.decode(record.encode()) == record


def test_delivery_record_encodes_non_ascii_as_utf8() -> None:
    record = DeliveryRecord("d", "m", "q", "é".encode(), 1, NOW, NOW + 30, None)
    assert "é".encode() in record.encode()


def test_message_ids_of_other_publishers_become_uuids_the_same_every_time() -> None:
    first = incoming(b"x", None, "order-17").message_id
    assert first == incoming(b"x", None, "order-17").message_id
    assert uuid.UUID(first) and first != incoming(b"x", None, "order-18").message_id
    upper = "1B4E28BA-2FA1-11D2-883F-0016D3CCA427"
    assert incoming(b"x", None, upper).message_id == upper.lower()
    assert uuid.UUID(incoming(b"x", None, None).message_id)


def test_a_record_carries_its_body_unescaped_after_one_line_of_json() -> None:
    body = b"\x00\x01\n{" * 1000  # JSON would write \u0000, \u0001: six bytes for one
    record = DeliveryRecord("d", "m", "q", body, 1, NOW, NOW + 30, None)
    encoded = record.encode()
    assert len(encoded) < len(body) + 200
    assert DeliveryRecord.decode(encoded) == record
    delayed = DelayedMessage("i", "topic", "t", body, NOW, 5)
    assert len(delayed.encode()) < len(body) + 200
    assert DelayedMessage.decode(delayed.encode()) == delayed


def test_records_written_as_one_json_object_are_still_read() -> None:
    old = b'{"id":"d","message_id":"m","queue":"q","body":"b\\n","attempt":2,'
    old += b'"delivered_at":1.0,"deadline":2.0,"expires_at":null}'
    assert DeliveryRecord.decode(old) == DeliveryRecord("d", "m", "q", b"b\n", 2, 1.0, 2.0, None)


def test_settlement_round_trip() -> None:
    for outcome in ("ack", "nack"):
        settlement = Settlement("dé-1", outcome, NOW)
        assert decode_settlement(settlement.encode()) == settlement


# validate.name


def test_empty_name_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="queue must not be empty"):
        validate.name("queue", "", "event_bus")


def test_name_of_255_bytes_is_allowed() -> None:
    assert validate.name("queue", "a" * 255, "event_bus") == "a" * 255


def test_name_of_256_bytes_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="topic must be at most 255 bytes"):
        validate.name("topic", "a" * 256, "event_bus")


@pytest.mark.parametrize("value", ["é", "queue\n", "a\tb", "a*b", "a$b", "q\x00", "[x]", "ü" * 10])
def test_name_with_a_character_the_client_library_refuses_is_rejected(value: str) -> None:
    with pytest.raises(InvalidArgument, match="queue may only contain A-Z a-z 0-9"):
        validate.name("queue", value, "event_bus")


def test_name_with_every_accepted_punctuation_is_allowed() -> None:
    value = "a-b_c.d:e@f#g,h/i+j k"
    assert validate.name("queue", value, "event_bus") == value


def test_name_in_amq_namespace_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match=r"must not start with 'amq\.'"):
        validate.name("queue", "amq.gen-123", "event_bus")


def test_name_merely_containing_amq_is_allowed() -> None:
    assert validate.name("queue", "amqueue", "event_bus") == "amqueue"
    assert validate.name("queue", "my.amq.x", "event_bus") == "my.amq.x"


def test_the_namespace_itself_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="queue must not be inside the bus's namespace"):
        validate.name("queue", "event_bus", "event_bus")


def test_name_inside_the_namespace_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="'event_bus'"):
        validate.name("group", "event_bus.acks", "event_bus")


def test_name_only_starting_with_the_namespace_letters_is_allowed() -> None:
    assert validate.name("queue", "event_busy", "event_bus") == "event_busy"
    assert validate.name("queue", "event_bus_x", "event_bus") == "event_bus_x"


def test_namespace_with_regex_characters_is_taken_literally() -> None:
    assert validate.name("queue", "nsXx", "ns.") == "nsXx"
    with pytest.raises(InvalidArgument, match="namespace"):
        validate.name("queue", "ns..x", "ns.")


# validate.data


def test_empty_data_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="data must not be empty"):
        validate.data("")


def test_data_is_returned_unchanged() -> None:
    assert validate.data(" x ") == " x "


# validate.delivery_id


def test_empty_delivery_id_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="id must not be empty"):
        validate.delivery_id("")


def test_garbage_delivery_id_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="'not-a-uuid' is not a delivery id"):
        validate.delivery_id("not-a-uuid")


def test_garbage_delivery_id_is_cut_short_in_the_message() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate.delivery_id("z" * 1000)
    assert "z" * 64 in caught.value.message
    assert "z" * 65 not in caught.value.message


def test_canonical_delivery_id_is_accepted() -> None:
    value = str(uuid.uuid4())
    assert validate.delivery_id(value) == value


def test_upper_case_delivery_id_is_accepted_and_lower_cased() -> None:
    value = "1B4E28BA-2FA1-11D2-883F-0016D3CCA427"
    assert validate.delivery_id(value) == "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


@pytest.mark.parametrize(
    "value",
    [
        "{1b4e28ba-2fa1-11d2-883f-0016d3cca427}",
        "urn:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        "1b4e28ba2fa111d2883f0016d3cca427",
        " 1b4e28ba-2fa1-11d2-883f-0016d3cca427",
    ],
)
def test_non_canonical_delivery_id_forms_are_rejected(value: str) -> None:
    with pytest.raises(InvalidArgument, match="is not a delivery id"):
        validate.delivery_id(value)


# validate.delay


def test_delay_up_to_the_maximum_is_allowed() -> None:
    assert validate.delay(0) == 0
    assert validate.delay(validate.MAX_DELAY_SECONDS) == validate.MAX_DELAY_SECONDS


def test_delay_beyond_the_maximum_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match=f"delaySeconds must be 0-{365 * 24 * 3600}"):
        validate.delay(validate.MAX_DELAY_SECONDS + 1)


def test_delay_limit_can_be_lowered() -> None:
    assert validate.delay(10, maximum=10) == 10
    with pytest.raises(InvalidArgument, match="0-10"):
        validate.delay(11, maximum=10)


# validate.ttl


def test_ttl_up_to_ten_years_is_allowed() -> None:
    assert validate.ttl(0) == 0
    assert validate.ttl(validate.MAX_TTL_SECONDS) == validate.MAX_TTL_SECONDS


@pytest.mark.parametrize("seconds", [validate.MAX_TTL_SECONDS + 1, 2**64 - 1, -1])
def test_ttl_out_of_range_is_rejected_naming_the_field_and_limit(seconds: int) -> None:
    with pytest.raises(InvalidArgument, match=f"ExpirationSeconds must be 0-{3650 * 24 * 3600}"):
        validate.ttl(seconds)


def test_internal_messages_are_persistent_json_each_with_its_own_id() -> None:
    first, second = internal_message(b"{}"), internal_message(b"{}")
    assert first.properties.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert first.properties.content_type == "application/json"
    assert first.properties.message_id and second.properties.message_id
    assert first.properties.message_id != second.properties.message_id
