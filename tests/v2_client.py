"""A small synchronous grpcio client for the v2 contract, for tests."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from eventbus._generated import v2_pb2

SUBSCRIBER = "eventbus.v2.Subscriber"


def message(queue: str = "", data: bytes = b"x", **fields: Any) -> v2_pb2.OutboundMessage:
    return v2_pb2.OutboundMessage(queue=queue, data=data, **fields)


class V2Client:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)

    def _unary(self, path: str, request: Any, reply: Any, timeout: float = 10) -> Any:
        call = self.channel.unary_unary(
            path,
            request_serializer=type(request).SerializeToString,
            response_deserializer=reply.FromString,
        )
        return call(request, timeout=timeout)

    def publish(self, *messages: v2_pb2.OutboundMessage) -> list[v2_pb2.PublishResult]:
        request = v2_pb2.PublishRequest(messages=messages)
        reply = self._unary("/eventbus.v2.Publisher/Publish", request, v2_pb2.PublishResponse)
        return list(reply.results)

    def pull(self, queue: str, **fields: Any) -> list[v2_pb2.ReceivedMessage]:
        request = v2_pb2.PullRequest(queue=queue, **fields)
        return list(self._unary(f"/{SUBSCRIBER}/Pull", request, v2_pb2.PullResponse).messages)

    def acknowledge(self, ack_ids: list[str]) -> list[str]:
        request = v2_pb2.AcknowledgeRequest(ack_ids=ack_ids)
        reply = self._unary(f"/{SUBSCRIBER}/Acknowledge", request, v2_pb2.AcknowledgeResponse)
        return list(reply.invalid_ack_ids)

    def nack(self, ack_ids: list[str], delay: int = 0, dead_letter: bool = False) -> list[str]:
        request = v2_pb2.NackRequest(ack_ids=ack_ids, delay_seconds=delay, dead_letter=dead_letter)
        return list(
            self._unary(f"/{SUBSCRIBER}/Nack", request, v2_pb2.NackResponse).invalid_ack_ids
        )

    def modify(self, ack_ids: list[str], seconds: int) -> list[str]:
        request = v2_pb2.ModifyAckDeadlineRequest(ack_ids=ack_ids, ack_deadline_seconds=seconds)
        reply = self._unary(
            f"/{SUBSCRIBER}/ModifyAckDeadline", request, v2_pb2.ModifyAckDeadlineResponse
        )
        return list(reply.invalid_ack_ids)

    def queue_info(self, queue: str) -> v2_pb2.QueueInfo:
        request = v2_pb2.GetQueueRequest(queue=queue)
        return self._unary("/eventbus.v2.Admin/GetQueue", request, v2_pb2.QueueInfo)

    def stream(self, queue: str, **first: Any) -> StreamHandle:
        return StreamHandle(self.channel, v2_pb2.StreamingPullRequest(queue=queue, **first))

    def close(self) -> None:
        self.channel.close()


class StreamHandle:
    """One StreamingPull: requests go through a queue; responses are read by a thread."""

    def __init__(
        self,
        channel: grpc.Channel,
        first: v2_pb2.StreamingPullRequest,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._requests: queue.Queue[v2_pb2.StreamingPullRequest | None] = queue.Queue()
        self._requests.put(first)
        call = channel.stream_stream(
            f"/{SUBSCRIBER}/StreamingPull",
            request_serializer=v2_pb2.StreamingPullRequest.SerializeToString,
            response_deserializer=v2_pb2.StreamingPullResponse.FromString,
        )
        self.call = call(self._iterate(), metadata=metadata)
        self.responses: queue.Queue[v2_pb2.StreamingPullResponse | Exception] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _iterate(self) -> Iterator[v2_pb2.StreamingPullRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.put(response)
        except Exception as error:  # the stream ended with a status
            self.responses.put(error)

    def send(self, **fields: Any) -> None:
        self._requests.put(v2_pb2.StreamingPullRequest(**fields))

    def receive(self, count: int, timeout: float = 10) -> list[v2_pb2.ReceivedMessage]:
        """At least count messages (all that came in the responses read), or TimeoutError."""
        got: list[v2_pb2.ReceivedMessage] = []
        while len(got) < count:
            got += self.next_response(timeout).messages
        return got

    def next_response(self, timeout: float = 10) -> v2_pb2.StreamingPullResponse:
        try:
            item = self.responses.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no response on the stream") from None
        if isinstance(item, Exception):
            raise item
        return item

    def quiet_for(self, seconds: float) -> list[v2_pb2.ReceivedMessage]:
        """Whatever messages arrive within seconds (expected: none)."""
        got: list[v2_pb2.ReceivedMessage] = []
        try:
            while True:
                got += self.next_response(seconds).messages
        except TimeoutError:
            return got

    def close(self) -> None:
        """Half-close: the server ends the stream."""
        self._requests.put(None)

    def cancel(self) -> None:
        """Break the stream from the client's side."""
        self.call.cancel()
