"""Client: the entry point of the Python client, over one grpclib channel to the daemon."""

from __future__ import annotations

import logging
import ssl as _ssl
import weakref
from collections.abc import Awaitable, Iterable

from .._generated import v2_grpc, v2_pb2
from .channel import Connection, Stubs
from .errors import translated
from .messages import OutboundMessage, PublishResult, ReceivedMessage
from .publisher import BatchLimits, Publisher
from .subscriber import Handler, SubscriberSettings, Subscription
from .v1 import V1

logger = logging.getLogger(__name__)


class Client:
    """A connection to an eventbus daemon: v2 publishing (batched or direct), subscribing over
    a stream or pulling, and the v1 calls under `client.v1`.

    Use it inside a running event loop, as `async with Client(...) as client:`; leaving the
    block stops its subscriptions and flushes its publishers, then closes the channel.
    `timeout` bounds each unary call (seconds); it may be None (no bound). `token`, when the
    daemon checks tokens, goes with every call as `authorization: Bearer TOKEN`; send it over
    TLS only (`ssl`)."""

    def __init__(
        self,
        target: str = "127.0.0.1:9091",
        *,
        ssl: _ssl.SSLContext | bool | None = None,
        timeout: float | None = 30.0,
        keepalive_seconds: float | None = 30.0,
        token: str | None = None,
    ) -> None:
        self._connection = Connection(target, ssl, keepalive_seconds, token)
        self.timeout = timeout
        self.v1 = V1(self._connection, timeout)
        self._publishers: weakref.WeakSet[Publisher] = weakref.WeakSet()
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the subscriptions (gracefully), flush and close the publishers, close the
        channel; waits for all of that."""
        for subscription in list(self._subscriptions):
            await _quietly(subscription.stop())
        for publisher in list(self._publishers):
            await publisher.aclose()
        self.close()

    def close(self) -> None:
        """Close the channel now: calls still open on it fail and subscriptions are cancelled
        (their unsettled messages come back). A later call opens a new channel."""
        for subscription in list(self._subscriptions):
            subscription.cancel()
        self._connection.close()

    def publisher(
        self,
        *,
        max_messages: int = 100,
        max_bytes: int = 1024 * 1024,
        max_latency: float = 0.01,
        max_batches_in_flight: int = 4,
    ) -> Publisher:
        """A batching publisher: see Publisher."""
        limits = BatchLimits(max_messages, max_bytes, max_latency, max_batches_in_flight)
        publisher = Publisher(self._publish, limits)
        self._publishers.add(publisher)
        return publisher

    async def publish_batch(self, messages: Iterable[OutboundMessage]) -> list[PublishResult]:
        """Publish the messages in one call; their results in the same order. The batch is
        checked whole: one invalid message fails the call (INVALID_ARGUMENT) and stores none."""
        return await self._publish([message.to_proto() for message in messages])

    async def _publish(self, messages: list[v2_pb2.OutboundMessage]) -> list[PublishResult]:
        request = v2_pb2.PublishRequest(messages=messages)
        with translated():
            reply = await self._stubs.publisher.Publish(request, timeout=self.timeout)
        return [PublishResult.from_proto(result) for result in reply.results]

    def subscribe(
        self,
        queue: str,
        handler: Handler,
        *,
        topic: str = "",
        max_outstanding_messages: int = 100,
        ack_deadline_seconds: int = 60,
        max_lease_seconds: float = 1500.0,
        retry_initial_seconds: float = 0.1,
        retry_max_seconds: float = 10.0,
    ) -> Subscription:
        """Start handling the messages of `queue` (with `topic`: the subscriber group `queue`
        bound to the topic) over one StreamingPull stream; see Subscription.

        `await handler(message)` runs for each message, at most max_outstanding_messages at
        once; it acks when the handler returns, nacks when it raises. Deadlines are
        ack_deadline_seconds long and extended while a message is unsettled, for at most
        max_lease_seconds. A stream broken with a retryable status (retry.RETRYABLE) is opened
        again after a backoff from retry_initial_seconds doubling up to retry_max_seconds."""
        settings = SubscriberSettings(
            queue,
            topic,
            max_outstanding_messages,
            ack_deadline_seconds,
            max_lease_seconds,
            retry_initial_seconds,
            retry_max_seconds,
        )
        subscription = Subscription(self._stubs.subscriber, handler, settings)
        self._subscriptions.add(subscription)
        return subscription

    async def pull(
        self,
        queue: str,
        max_messages: int = 1,
        wait_seconds: float = 0.0,
        *,
        topic: str = "",
    ) -> list[ReceivedMessage]:
        """Up to max_messages messages, waiting up to wait_seconds for the first; ack, nack or
        extend them by ack_id with the calls below. Their deadline is the queue's policy's."""
        request = v2_pb2.PullRequest(
            queue=queue, topic=topic, max_messages=max_messages, wait_seconds=wait_seconds
        )
        timeout = None if self.timeout is None else self.timeout + wait_seconds
        with translated():
            reply = await self._stubs.subscriber.Pull(request, timeout=timeout)
        return [ReceivedMessage.from_proto(message) for message in reply.messages]

    async def acknowledge(self, ack_ids: Iterable[str]) -> list[str]:
        """Ack deliveries; returns the ids that named no current delivery."""
        request = v2_pb2.AcknowledgeRequest(ack_ids=list(ack_ids))
        with translated():
            reply = await self._stubs.subscriber.Acknowledge(request, timeout=self.timeout)
        return list(reply.invalid_ack_ids)

    async def nack(
        self, ack_ids: Iterable[str], *, delay_seconds: int = 0, dead_letter: bool = False
    ) -> list[str]:
        """Give deliveries back, due again after delay_seconds (0: the queue's backoff), or
        dead-lettered now; returns the ids that named no current delivery."""
        request = v2_pb2.NackRequest(
            ack_ids=list(ack_ids), delay_seconds=delay_seconds, dead_letter=dead_letter
        )
        with translated():
            reply = await self._stubs.subscriber.Nack(request, timeout=self.timeout)
        return list(reply.invalid_ack_ids)

    async def modify_ack_deadline(
        self, ack_ids: Iterable[str], ack_deadline_seconds: int
    ) -> list[str]:
        """Set deliveries' deadlines to ack_deadline_seconds from now (0 nacks them); returns
        the ids that named no current delivery."""
        request = v2_pb2.ModifyAckDeadlineRequest(
            ack_ids=list(ack_ids), ack_deadline_seconds=ack_deadline_seconds
        )
        with translated():
            reply = await self._stubs.subscriber.ModifyAckDeadline(request, timeout=self.timeout)
        return list(reply.invalid_ack_ids)

    @property
    def admin(self) -> v2_grpc.AdminStub:
        """The eventbus.v2.Admin stub on this client's channel (an admin identity's calls)."""
        return self._connection.stubs.admin

    @property
    def _stubs(self) -> Stubs:
        return self._connection.stubs


async def _quietly(stopping: Awaitable[None]) -> None:
    """Wait for a subscription to stop; the error that ended it was its owner's to see."""
    try:
        await stopping
    except Exception as error:
        logger.debug("subscription ended with %r", error)
