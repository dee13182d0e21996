"""Random bytes as a request, through grpclib's own recv_message, the framed stream and the
protobuf codec: a message or a GRPCError with a client-error status, never anything else."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import Buffer
from grpclib.stream import recv_message
from hypothesis import given, settings
from hypothesis import strategies as st

from eventbus._generated import mq_pb2
from eventbus.api.framing import FramedStream, MessageLimits, check_prefix
from eventbus.api.v1 import SizeLimitedCodec

MAX_BYTES = 1024
REQUEST_TYPES = [
    mq_pb2.PublishRequest,
    mq_pb2.DelayPublishRequest,
    mq_pb2.SubscribeRequest,
    mq_pb2.QueueId,
    mq_pb2.TopicPublishRequest,
    mq_pb2.DelayTopicPublishRequest,
    mq_pb2.TopicSubscribeRequest,
]
CLIENT_ERRORS = {Status.INVALID_ARGUMENT, Status.RESOURCE_EXHAUSTED}


def framed_stream(data: bytes) -> FramedStream:
    """A server stream (no connection behind it) whose client sent data, then END_STREAM."""
    stream = FramedStream(None, None, None)  # type: ignore[arg-type]
    stream.limits = MessageLimits(MAX_BYTES, timeout=5.0)
    stream.needs_message = True
    stream.buffer = Buffer(lambda size: None)
    stream._deadline = asyncio.get_running_loop().time() + 5.0
    if data:
        stream.buffer.add(data, len(data))
    stream.buffer.eof()
    return stream


async def receive(data: bytes, message_type: Any) -> Any:
    return await recv_message(framed_stream(data), SizeLimitedCodec(MAX_BYTES), message_type)


def frames() -> st.SearchStrategy[bytes]:
    """Mostly well-framed random bodies, some with lying lengths or flags, some pure noise."""
    body = st.binary(max_size=64)
    honest = body.map(lambda b: struct.pack(">BI", 0, len(b)) + b)
    lying = st.tuples(st.integers(0, 255), st.integers(0, 2**32 - 1), body).map(
        lambda t: struct.pack(">BI", t[0], t[1]) + t[2]
    )
    return honest | lying | st.binary(max_size=80)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2 * MAX_BYTES), st.sampled_from(REQUEST_TYPES))
def test_codec_decodes_or_answers_a_client_error(body: bytes, message_type: Any) -> None:
    try:
        message = SizeLimitedCodec(MAX_BYTES).decode(body, message_type)
    except GRPCError as error:
        assert error.status in CLIENT_ERRORS, error
        assert error.message
    else:
        assert isinstance(message, message_type)


@settings(max_examples=500, deadline=None)
@given(frames(), st.sampled_from(REQUEST_TYPES))
def test_random_request_streams_decode_or_answer_a_client_error(
    data: bytes, message_type: Any
) -> None:
    try:
        message = asyncio.run(receive(data, message_type))
    except GRPCError as error:
        assert error.status in CLIENT_ERRORS | {Status.UNIMPLEMENTED}, error
        assert error.message
    else:
        assert isinstance(message, message_type)


@pytest.mark.parametrize(
    ("prefix", "status"),
    [
        (struct.pack(">BI", 0, MAX_BYTES + 1), Status.RESOURCE_EXHAUSTED),
        (struct.pack(">BI", 1, 3), Status.UNIMPLEMENTED),
        (struct.pack(">BI", 2, 3), Status.INVALID_ARGUMENT),
    ],
)
def test_prefix_refused(prefix: bytes, status: Status) -> None:
    with pytest.raises(GRPCError) as caught:
        check_prefix(prefix, MAX_BYTES)
    assert caught.value.status == status


def test_prefix_within_the_limit_gives_the_length() -> None:
    assert check_prefix(struct.pack(">BI", 0, MAX_BYTES), MAX_BYTES) == MAX_BYTES
