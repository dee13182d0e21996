"""Publishing with publisher confirms over one shared pool of channels; declarations cached.

Every queue and topic publishes over the same `amqp.publish_channels` confirm channels, each
target spread over `amqp.producers_per_queue` of them, so the daemon's channel count stays the
same however many queues clients use. Declarations go over a few channels of their own, one at a
time each: a declaration RabbitMQ refuses closes its channel, and that must fail nothing else.

The request path (gRPC handlers) publishes from the asyncio side of the seam with `publish`, so
a call costs no task of its own; trio code uses `to_queue` / `to_targets`, which cross the seam
once. Every publish waits for RabbitMQ's confirm (or a return, for an unroutable message) under
PUBLISH_TIMEOUT, so a broken connection turns into Unavailable within seconds, never a hang.

The bulk path (`to_targets`) reports an Outcome per message instead of raising: one message that
cannot go (refused by the client library while marshalling, or by RabbitMQ, which then closes
the channel) is reported refused, and the others of its batch are confirmed all the same. A
target that cannot take messages now (missing, full, declared otherwise) makes them unavailable,
not refused: they may go once it is put right.

Every durable queue the bus declares, clients' and its own, has the type amqp.queue_type asks
(queue_arguments); one that exists with the other type is refused as QueueTypeMismatch, naming
the queue and how to migrate it. On RabbitMQ 4.0 or later (the version the broker gave when the
connection opened) a quorum queue is declared with x-delivery-limit -1, RabbitMQ's default
limit of 20 being no limit the bus wants (delivery_limit); one declared on 3.x without it is
taken as it is, with a warning.

While RabbitMQ blocks publishers (a memory or disk alarm), every publish fails at once with
Unavailable, before anything is written: the message was not stored. A message written before
the block began, or whose confirm does not come in time, may have been stored or not: the single
path says so in its Unavailable; the bulk path's Outcome carries the pending confirmation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import aio_pika
import aio_pika.abc
import aiormq
import aiormq.exceptions
import trio
from pamqp.commands import Basic

from ..backends import aio
from ..backends.broker import BROKER_ERRORS, Broker
from ..backends.retry import describe
from ..config import AmqpConfig
from ..errors import (
    CallError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QueueTypeMismatch,
    Unavailable,
)
from . import bulk
from .channels import (
    DECLARING_CHANNELS,
    PUBLISH_TIMEOUT,
    REFUSALS,
    ChannelPool,
    ChannelRefused,
    Declared,
    Declarer,
    Returned,
    bounded,
)
from .envelope import Kind, Outgoing
from .outbox import Outbox

logger = logging.getLogger(__name__)

T = TypeVar("T")

BULK_PER_DEADLINE = 5000  # a bulk publish gets PUBLISH_TIMEOUT more for each this many messages
MISMATCH_SECONDS = 1.0  # a queue found of the other type is refused without asking this long
MISMATCHES_MAX = 1000
PROBES = 4  # declarations probing a queue's type, at most, each adopting what RabbitMQ names

Target = tuple[Kind, str]  # ("queue", name) or ("topic", name)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one message of a bulk publish: confirmed; unavailable (RabbitMQ could not
    take it now: try again later); or refused (it will never go as it is: error says why).

    pending is set for an unavailable message that was written on a connection still open but
    whose confirm did not come in time (RabbitMQ blocked publishers meanwhile, or is slow): it
    may yet be stored. The future resolves when RabbitMQ confirms it (to Basic.Ack, or to the
    message when returned as unroutable), and fails when its channel or connection closes (then
    it may or may not have been stored). A caller that must not publish a second copy waits on
    it before trying again; it is never cancelled here.
    """

    status: Literal["confirmed", "unavailable", "refused"]
    error: CallError | None = None
    pending: asyncio.Future[Any] | None = None

    @property
    def reason(self) -> str:
        return self.error.message if self.error is not None else ""


CONFIRMED = Outcome("confirmed")


def outcome_of(error: CallError) -> Outcome:
    """What a failure not pinned on the message itself means: a name the client library refuses
    never goes; anything else (RabbitMQ away, a target missing, locked, declared otherwise, or
    of the other type: an operator's migration under way puts it right) may be put right, so
    the message waits. A client publishing to a queue of the other type is refused all the same:
    its call declares the queue first, which fails with QueueTypeMismatch."""
    return Outcome("refused" if isinstance(error, InvalidArgument) else "unavailable", error)


def queue_arguments(
    config: AmqpConfig, *, internal: bool, server_version: str | None = None
) -> dict[str, Any]:
    """The arguments of a durable queue the bus declares: x-queue-type quorum with
    amqp.queue_type "quorum" (none for classic, as before: an existing classic queue declared
    without it stays equivalent), and for a client's queue x-expires with
    amqp.queue_idle_expiry_seconds > 0 (quorum queues take it, RabbitMQ 3.10 and later); for a
    quorum queue on RabbitMQ 4.0 or later (server_version), x-delivery-limit -1 (with_limit)."""
    arguments: dict[str, Any] = {}
    if config.queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    if not internal and config.queue_idle_expiry_seconds:
        arguments["x-expires"] = config.queue_idle_expiry_seconds * 1000
    return with_limit(arguments, server_version)


def delivery_limit(server_version: str | None) -> int | None:
    """The x-delivery-limit for a quorum queue on RabbitMQ of this version: -1 (no limit) from
    4.0 on, which otherwise limits it to 20; none before (3.x sets no limit, and has a queue
    declared without one refuse a declaration with one), nor for a version not known.

    No limit, because RabbitMQ's delivery count does not count the bus's retries (a retry is a
    new message the republish cron publishes; a delivery is acked as soon as its record is
    confirmed) but only the bus's own hand-backs (prefetched messages returned after
    amqp.buffer_hold_seconds, by rebalancing or from a full byte budget, and on a lost
    connection), which recur without bound in a healthy queue. A limit would dead-letter, or
    without a dead-letter target silently drop, messages no subscriber ever saw; the bus's own
    max_retries and dead letters (kept in PostgreSQL, requeueable) are the limit instead."""
    major = re.match(r"\s*v?(\d+)\.", server_version or "")
    return -1 if major is not None and int(major[1]) >= 4 else None


def with_limit(arguments: dict[str, Any], server_version: str | None) -> dict[str, Any]:
    """A queue's arguments as declared on RabbitMQ of server_version: a quorum queue's with
    x-delivery-limit as delivery_limit says (without it where that says none)."""
    declared = {k: v for k, v in arguments.items() if k != "x-delivery-limit"}
    limit = delivery_limit(server_version)
    if declared.get("x-queue-type") == "quorum" and limit is not None:
        declared["x-delivery-limit"] = limit
    return declared


def limit_refused(message: str, arguments: dict[str, Any]) -> bool:
    """Whether RabbitMQ refused a declaration with x-delivery-limit over that argument alone:
    the quorum queue exists without one (declared on RabbitMQ 3.x, before an upgrade to 4)."""
    named = refused_argument(message)
    return "x-delivery-limit" in arguments and named is not None and named[0] == "x-delivery-limit"


class Mismatches:
    """(asyncio side) Queues found to be of the other type, remembered per connection for
    MISMATCH_SECONDS (at most MISMATCHES_MAX of them): a client publishing to one again and
    again is refused at once, rather than taking a declaring channel each time (that RabbitMQ
    then closes) from those other queues' declarations need."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._known: OrderedDict[str, tuple[int, float, str]] = OrderedDict()

    def check(self, queue: str) -> None:
        """Raise QueueTypeMismatch when queue was found of the other type a moment ago."""
        known = self._known.get(queue)
        if known is None:
            return
        generation, until, message = known
        if generation == self._broker.generation and asyncio.get_running_loop().time() < until:
            raise QueueTypeMismatch(message)
        del self._known[queue]

    def add(self, queue: str, message: str) -> None:
        until = asyncio.get_running_loop().time() + MISMATCH_SECONDS
        self._known[queue] = (self._broker.generation, until, message)
        self._known.move_to_end(queue)
        while len(self._known) > MISMATCHES_MAX:
            self._known.popitem(last=False)


class Publisher:
    """Confirmed publishing to queues and topic exchanges, over one shared pool of channels."""

    def __init__(
        self, broker: Broker, config: AmqpConfig, *, auto_create_queues: bool = True
    ) -> None:
        self._broker = broker
        self._pool = ChannelPool(broker, config.publish_channels)
        self._spread = min(config.producers_per_queue, config.publish_channels)
        self._declarer = Declarer(broker, DECLARING_CHANNELS)
        self._prober = Declarer(broker, DECLARING_CHANNELS, publishing=True)
        self._declared = Declared(broker)
        self._mismatches = Mismatches(broker)
        self._declaring: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._namespace = config.namespace
        self._auto_create = auto_create_queues
        self._queue_type = config.queue_type
        self._config = config
        self._limitless: set[str] = set()  # quorum queues taken without x-delivery-limit
        self._turn: Iterator[int] = itertools.count()
        self._outbox = Outbox()  # single publishes of one turn, written together per channel

    @property
    def generation(self) -> int:
        """Which connection to RabbitMQ publishes now (see Broker.generation)."""
        return self._broker.generation

    def _channels_of(self, name: str, channels: list[aiormq.Channel]) -> list[aiormq.Channel]:
        """The producers_per_queue channels of the pool a target publishes over."""
        first = zlib.crc32(name.encode())
        return [channels[(first + k) % len(channels)] for k in range(self._spread)]

    async def publish(self, queue: str, message: Outgoing) -> None:
        """(asyncio side) Publish to queue, declaring it once, and wait for the confirm."""
        await self.publish_to(("queue", queue), message)

    async def publish_topic(self, topic: str, message: Outgoing) -> None:
        """(asyncio side) Publish to a topic exchange and wait for the confirm. Every queue
        bound to it gets the message; with none bound it goes nowhere, as pub/sub has it."""
        await self.publish_to(("topic", topic), message)

    async def publish_to(self, target: Target, message: Outgoing) -> None:
        """(asyncio side) Publish to ("queue", name) or ("topic", name) and wait for the
        confirm. A message RabbitMQ returns as unroutable (its queue was deleted behind our
        back) is declared and published once more; so is one whose channel RabbitMQ closed
        (another message on it may have been the one refused). Twice refused: FailedPrecondition.

        Unavailable at once, nothing written, while RabbitMQ blocks publishers; Unavailable
        saying the message may have been stored when it was written but its confirm did not
        come within PUBLISH_TIMEOUT, or RabbitMQ began blocking publishers meanwhile.
        """
        what = f"publishing to {target[1]!r}"
        for last in (False, True):
            try:
                await self._publish_once(target, message, what)
                return
            except Returned:
                self._declared.discard(target)
                if last:
                    raise Unavailable(f"RabbitMQ returned the message {what} twice") from None
            except ChannelRefused as error:
                self._declared.discard(target)
                if last:
                    raise FailedPrecondition(f"RabbitMQ refused {what}: {error}") from None

    async def _publish_once(self, target: Target, message: Outgoing, what: str) -> None:
        """Write the message and wait for its confirm, PUBLISH_TIMEOUT in all."""
        self._broker.refuse_while_blocked()
        started = asyncio.get_running_loop().time()
        confirmation = await bounded(what, self._send(target, message))
        left = PUBLISH_TIMEOUT - (asyncio.get_running_loop().time() - started)
        await until_confirmed([confirmation], left, self._broker)
        if not confirmation.done():
            raise may_have_been_stored(what, self._broker.blocked)
        await bounded(what, _confirmed(confirmation, target))

    async def _send(self, target: Target, message: Outgoing) -> asyncio.Future[Any]:
        """Declare the target (once) and write the message on one of its channels; returns its
        confirmation."""
        await self._declare_target(target)
        options = self._channels_of(target[1], await self._pool.channels())
        channel = options[next(self._turn) % len(options)]
        self._broker.refuse_while_blocked()  # a block may have begun while declaring
        try:
            return await self._outbox.send(channel, _publish_of(target, message))
        except REFUSALS as error:
            raise ChannelRefused(describe(error)) from None

    async def _declare_target(self, target: Target) -> None:
        kind, name = target
        if kind == "topic":
            await self.declare_topic(name)
        else:
            await self.declare(name)

    def _internal(self, queue: str) -> bool:
        return queue == self._namespace or queue.startswith(self._namespace + ".")

    def queue_arguments(self, *, internal: bool) -> dict[str, Any]:
        """The arguments this publisher declares a client's queue or one of the bus's with, on
        the broker connected to now (its version decides x-delivery-limit: with_limit)."""
        version = self._broker.server_version
        return queue_arguments(self._config, internal=internal, server_version=version)

    async def declare(self, queue: str) -> None:
        """(asyncio side) Make sure a queue exists, once per connection: declared durable with
        queue_arguments, or, with server.auto_create_queues false, only looked up: NotFound
        when it does not exist. The bus's own queues are always declared, never with x-expires.
        QueueTypeMismatch when it exists as the other type than amqp.queue_type, remembered
        for MISMATCH_SECONDS. Callers at once share one declaration of a queue."""
        if ("queue", queue) in self._declared:
            return
        self._mismatches.check(queue)
        key = (queue, self._broker.generation)
        declaring = self._declaring.get(key)
        if declaring is None:
            declaring = self._declaring[key] = asyncio.ensure_future(
                self._declare_or_look_up(queue)
            )
            declaring.add_done_callback(_retrieve)
            declaring.add_done_callback(lambda _: self._declaring.pop(key, None))
        await asyncio.shield(declaring)  # a caller that leaves does not cut it (finish_anyway)

    async def _declare_or_look_up(self, queue: str) -> None:
        internal = self._internal(queue)
        try:
            if internal or self._auto_create:
                await self._declare_queue(queue, self.queue_arguments(internal=internal), internal)
            else:
                await self._look_up(queue)
        except QueueTypeMismatch as mismatch:
            self._mismatches.add(queue, mismatch.message)
            raise
        self._declared.add(("queue", queue))

    async def _declare_queue(self, queue: str, arguments: dict[str, Any], internal: bool) -> None:
        try:
            await self._declare_with(queue, arguments)
        except FailedPrecondition as error:
            if limit_refused(error.message, arguments):
                await self._declare_limitless(queue, arguments)
                return
            if await self._other_type(queue, error):
                message = type_mismatch(queue, self._queue_type, internal)
                raise QueueTypeMismatch(message) from None
            raise FailedPrecondition(_other_settings(queue, arguments, error)) from None

    async def _declare_with(self, queue: str, arguments: dict[str, Any]) -> None:
        async with self._declarer.channel() as channel:
            declaring = channel.declare_queue(queue, durable=True, arguments=arguments or None)
            await bounded(f"declaring queue {queue!r}", declaring)

    async def _declare_limitless(self, queue: str, arguments: dict[str, Any]) -> None:
        """Take a quorum queue as it is when it exists without x-delivery-limit (declared on
        RabbitMQ 3.x, before an upgrade to 4): RabbitMQ 4 gives it a delivery limit of 20,
        which a policy with delivery-limit -1 lifts. Said once per queue."""
        without = {k: v for k, v in arguments.items() if k != "x-delivery-limit"}
        await self._declare_queue(queue, without, self._internal(queue))
        if queue not in self._limitless:
            self._limitless.add(queue)
            logger.warning(
                "queue %r exists without x-delivery-limit: RabbitMQ %s drops (or dead-letters) "
                "a message handed back 20 times; apply a policy with delivery-limit -1 to it",
                queue,
                self._broker.server_version,
            )

    async def _other_type(self, queue: str, refusal: FailedPrecondition) -> bool:
        """Whether a queue RabbitMQ refused to declare exists as the other type. RabbitMQ
        names the first argument that differs, and compares some (x-expires) before
        x-queue-type: when it named another, the queue is declared once more with the type and
        the value RabbitMQ says the queue has for each argument named, until RabbitMQ names
        the type or takes the declaration (a refused declaration changes nothing; one taken
        changes nothing either). The queue is looked up passively first, so that a probe never
        creates a queue gone meanwhile: Unavailable then, to be tried again."""
        if refused_argument(refusal.message) == ("x-queue-type", None):
            return True
        await self._still_there(queue)
        typed = self.queue_arguments(internal=True)
        probe = {k: v for k, v in typed.items() if k == "x-queue-type"}
        message = refusal.message
        for _ in range(PROBES):
            named = refused_argument(message)
            if named is None or not named[0].startswith("x-"):  # not an argument: durable...
                return False
            if named[0] == "x-queue-type":
                return True
            name, current = named
            if current is None:
                probe.pop(name, None)
            else:
                probe[name] = current
            try:
                await self._declare_with(queue, probe)
            except FailedPrecondition as error:
                message = error.message
                continue
            return False
        return False

    async def _still_there(self, queue: str) -> None:
        await self._passively(
            queue, Unavailable(f"queue {queue!r} went away while the bus declared it; try again")
        )

    async def _look_up(self, queue: str) -> None:
        await self._passively(
            queue,
            NotFound(f"queue {queue!r} does not exist, and server.auto_create_queues is false"),
        )

    async def _passively(self, queue: str, missing: Exception) -> None:
        """The queue looked up without declaring it; missing raised when there is none."""
        async with self._declarer.channel() as channel:
            try:
                await bounded(
                    f"looking up queue {queue!r}", channel.declare_queue(queue, passive=True)
                )
            except NotFound:
                raise missing from None

    async def declare_topic(self, topic: str) -> None:
        """(asyncio side) Declare a durable topic exchange once per connection."""
        if ("topic", topic) not in self._declared:
            await finish_anyway(self._declare_topic(topic))

    async def _declare_topic(self, topic: str) -> None:
        async with self._declarer.channel() as channel:
            declaring = channel.declare_exchange(topic, aio_pika.ExchangeType.TOPIC, durable=True)
            await bounded(f"declaring topic {topic!r}", declaring)
        self._declared.add(("topic", topic))

    async def bind(self, queue: str, topic: str) -> None:
        """(asyncio side) Declare queue and topic and bind them, once per connection: from then
        on the queue gets every message published to the topic."""
        if ("binding", queue, topic) in self._declared:
            return
        await self.declare_topic(topic)
        await self.declare(queue)
        await finish_anyway(self._bind(queue, topic))

    async def _bind(self, queue: str, topic: str) -> None:
        async with self._declarer.channel() as channel:
            underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
            binding = underlay.queue_bind(queue, topic, routing_key="#")
            await bounded(f"binding {queue!r} to {topic!r}", binding)
        self._declared.add(("binding", queue, topic))

    async def message_count(self, queue: str) -> int:
        """(asyncio side) How many messages wait in an existing queue (a passive declare on a
        declaring channel, which nothing publishes on; a caller that leaves does not cut it)."""
        return await finish_anyway(self._message_count(queue))

    async def _message_count(self, queue: str) -> int:
        async with self._declarer.channel() as channel:
            declared = await bounded(
                f"inspecting queue {queue!r}", channel.declare_queue(queue, passive=True)
            )
        return int(declared.declaration_result.message_count or 0)

    async def to_queue(self, queue: str, message: Outgoing) -> None:
        """(trio side) Publish to a queue and wait for the confirm."""
        await aio.call(self.publish, queue, message)

    async def to_targets(self, messages: Sequence[tuple[Target, Outgoing]]) -> list[Outcome]:
        """(trio side) Publish many messages at once, each to its queue or topic; returns once
        each is confirmed, refused or given up on, with one Outcome per message, in order.
        Every broker call below has its own deadline; should they add up past bulk_deadline
        (declarations, probes and publishing again after a refusal), trio.TooSlowError."""
        with trio.fail_after(bulk_deadline(len(messages))):
            return await aio.call(self._publish_all, messages)

    async def publish_many(self, messages: Sequence[tuple[Target, Outgoing]]) -> list[Outcome]:
        """(asyncio side) to_targets for the request path: one Outcome per message, in order;
        Unavailable when the whole batch took longer than bulk_deadline."""
        seconds = bulk_deadline(len(messages))
        try:
            async with asyncio.timeout(seconds):
                return await self._publish_all(messages)
        except TimeoutError:
            raise Unavailable(
                f"RabbitMQ did not take a batch of {len(messages)} within {seconds:g} s; "
                "part of it may have been stored"
            ) from None

    async def declare_queue(self, queue: str, *, again: bool = False) -> None:
        """(trio side) `declare` a queue; again: even when declared on this connection already
        (a consumer starting anew, whose queue may have been deleted meanwhile)."""
        if again:
            self._declared.discard(("queue", queue))
        await aio.call(self.declare, queue)

    async def _publish_all(self, messages: Sequence[tuple[Target, Outgoing]]) -> list[Outcome]:
        """(asyncio side) The bulk path: each target declared once, then every message sent in
        one write per channel, under one deadline that grows with the batch. What RabbitMQ
        returns as unroutable, or lost when RabbitMQ closed its channel over another message,
        goes again, one by one, through the single path. While RabbitMQ blocks publishers,
        every message is unavailable at once."""
        try:
            self._broker.refuse_while_blocked()
        except Unavailable as error:
            return [Outcome("unavailable", error)] * len(messages)
        outcomes: list[Outcome | None] = [None] * len(messages)
        refused = await self._declare_targets(dict.fromkeys(t for t, _ in messages))
        for i, (target, _) in enumerate(messages):
            outcomes[i] = refused.get(target)
        for batch in _rounds([i for i, o in enumerate(outcomes) if o is None], messages):
            await self._publish_round(batch, messages, outcomes)
        return [o if o is not None else CONFIRMED for o in outcomes]

    async def _declare_targets(self, targets: dict[Target, None]) -> dict[Target, Outcome]:
        """Declare targets, a few at a time; returns the outcome of those that failed."""
        failed: dict[Target, Outcome] = {}

        async def declare(target: Target) -> None:
            try:
                await self._declare_target(target)
            except CallError as error:
                failed[target] = outcome_of(error)

        await asyncio.gather(*(declare(target) for target in targets))
        return failed

    async def _publish_round(
        self,
        indexes: list[int],
        messages: Sequence[tuple[Target, Outgoing]],
        outcomes: list[Outcome | None],
    ) -> None:
        try:
            channels = await self._pool.channels()
            self._broker.refuse_while_blocked()
        except CallError as error:
            for i in indexes:
                outcomes[i] = outcome_of(error)
            return
        # All of a target's messages go on one channel, so they reach its queues in order.
        per_channel: dict[aiormq.Channel, list[int]] = {}
        chosen: dict[Target, aiormq.Channel] = {}
        for i in indexes:
            target = messages[i][0]
            if target not in chosen:
                options = self._channels_of(target[1], channels)
                chosen[target] = options[next(self._turn) % len(options)]
            per_channel.setdefault(chosen[target], []).append(i)
        results = await _send_and_confirm(per_channel, messages, self._broker)
        for indexes in per_channel.values():
            lost = []
            for i in indexes:
                outcomes[i] = _outcome_of_result(results[i])
                if outcomes[i] is None and isinstance(results[i], REFUSALS):
                    lost.append(i)
                elif outcomes[i] is None:  # returned as unroutable: the queue went away
                    self._declared.discard(messages[i][0])
                    outcomes[i] = await self._publish_alone(*messages[i])
            if lost:
                await self._find_refused(lost, messages, outcomes)

    async def _find_refused(
        self,
        lost: list[int],
        messages: Sequence[tuple[Target, Outgoing]],
        outcomes: list[Outcome | None],
    ) -> None:
        """RabbitMQ closed a channel over a message, and the lost ones (in the order sent) never
        had their confirm. Each is tried in turn as a probe (a copy that reaches no queue); the
        first probe refused is the culprit. Every other lost message is published again: those
        sent before it may have gone through, but on a shared channel another sender's refused
        message may have closed it first, and a duplicate is allowed where a loss is not."""
        for k, i in enumerate(lost):
            probed = await self._probe(messages[i][1])
            if probed is CONFIRMED:
                continue
            outcomes[i] = probed
            if probed.status == "unavailable":
                for j in lost:
                    outcomes[j] = probed
                return
            rest = lost[:k] + lost[k + 1 :]
            again = await self._publish_all([messages[j] for j in rest])
            for j, outcome in zip(rest, again, strict=True):
                outcomes[j] = outcome
            return
        # None of them is refused: the channel closed over another sender's message, or over
        # the target (an exchange deleted behind the bus's back). They go again, declared anew.
        for i in lost:
            self._declared.discard(messages[i][0])
            outcomes[i] = await self._publish_alone(*messages[i])

    async def _probe(self, message: Outgoing) -> Outcome:
        """Publish a copy of message that no queue receives (mandatory, to no queue), on a
        channel of its own on the connection that publishes: refused when RabbitMQ refuses the
        message itself. A channel whose probe failed is closed, never used again."""
        probe = bulk.Publish("", "", True, message.body, message.properties)
        try:
            self._broker.refuse_while_blocked()
            async with self._prober.channel() as channel:
                underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
                (confirmation,) = await bulk.send(underlay, [probe])
                await bounded("probing a message", confirmation)
        except FailedPrecondition as error:
            return Outcome("refused", error)
        except CallError as error:
            return outcome_of(error)
        return CONFIRMED

    async def _publish_alone(self, target: Target, message: Outgoing) -> Outcome:
        """Publish one message on its own; refused only when a probe pins the refusal on the
        message rather than on its target."""
        try:
            await self.publish_to(target, message)
        except (FailedPrecondition, NotFound) as error:
            probed = await self._probe(message)
            return probed if probed.status == "refused" else Outcome("unavailable", error)
        except CallError as error:
            return outcome_of(error)
        return CONFIRMED


async def _send_and_confirm(
    per_channel: dict[aiormq.Channel, list[int]],
    messages: Sequence[tuple[Target, Outgoing]],
    broker: Broker,
) -> dict[int, Any]:
    """Send each channel's messages in one write and wait for their confirms, all under one
    deadline (a broker that stops reading blocks the sends themselves); once RabbitMQ blocks
    publishers nothing more is sent, nor waited for. Returns, per message index, what its
    confirmation resolved to, the error, or Pending."""
    futures: dict[int, asyncio.Future[Any]] = {}
    indexes = [i for sent in per_channel.values() for i in sent]
    seconds = PUBLISH_TIMEOUT * (1 + len(indexes) // BULK_PER_DEADLINE)
    deadline = asyncio.get_running_loop().time() + seconds
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            for channel, sent in per_channel.items():
                if broker.blocked:
                    break
                futures.update(zip(sent, await _send(channel, sent, messages), strict=True))
    await until_confirmed(futures.values(), deadline - asyncio.get_running_loop().time(), broker)
    return {i: _result_of(futures.get(i), seconds, broker.blocked) for i in indexes}


async def until_confirmed(
    confirmations: Collection[asyncio.Future[Any]], seconds: float, broker: Broker
) -> None:
    """(asyncio side) Wait until every confirmation is done, for at most seconds, and no longer
    once RabbitMQ blocks publishers (the rest would come only after the block). The
    confirmations themselves are left as they are, never cancelled."""
    waiting = [c for c in confirmations if not c.done()]
    if not waiting or broker.blocked or seconds <= 0:
        return
    woken = asyncio.get_running_loop().create_future()
    countdown = Countdown(len(waiting), woken)
    watch = BlockWatch.of(broker)
    blocked = watch.enter()
    for confirmation in waiting:
        confirmation.add_done_callback(countdown.one_done)
    blocked.add_done_callback(countdown.wake)
    try:
        await asyncio.wait([woken], timeout=seconds)
    finally:
        for confirmation in waiting:
            confirmation.remove_done_callback(countdown.one_done)
        blocked.remove_done_callback(countdown.wake)
        watch.leave()


class Countdown:
    """Wakes a future once count futures are done, or at once by wake()."""

    def __init__(self, count: int, woken: asyncio.Future[None]) -> None:
        self._left = count
        self._woken = woken

    def one_done(self, _: asyncio.Future[Any]) -> None:
        self._left -= 1
        if self._left <= 0:
            self.wake(_)

    def wake(self, _: asyncio.Future[Any]) -> None:
        if not self._woken.done():
            self._woken.set_result(None)


class BlockWatch:
    """(asyncio side) One task per broker waiting for RabbitMQ to block publishers, shared by
    whoever waits for confirmations meanwhile (a task each would cost every publish one), and
    cancelled once nobody does."""

    _watches: weakref.WeakKeyDictionary[Broker, BlockWatch] = weakref.WeakKeyDictionary()

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._task: asyncio.Future[None] | None = None
        self._users = 0

    @classmethod
    def of(cls, broker: Broker) -> BlockWatch:
        watch = cls._watches.get(broker)
        if watch is None:
            watch = cls._watches[broker] = cls(broker)
        return watch

    def enter(self) -> asyncio.Future[None]:
        """A future done once RabbitMQ blocks publishers; leave() when no longer waiting."""
        task = self._task
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            task = self._task = asyncio.ensure_future(self._broker.until_blocked())
            task.add_done_callback(_retrieve)
        self._users += 1
        return task

    def leave(self) -> None:
        self._users -= 1
        if self._users <= 0 and self._task is not None:
            self._users = 0
            self._task.cancel()
            self._task = None


async def _confirmed(confirmation: asyncio.Future[Any], target: Target) -> None:
    """A done confirmation's result: returns for an ack, else raises what it means."""
    try:
        result = await confirmation
    except REFUSALS as error:
        raise ChannelRefused(describe(error)) from None
    except bulk.Unmarshallable as error:
        raise InvalidArgument(f"the message to {target[1]!r} cannot be sent: {error}") from None
    if not isinstance(result, Basic.Ack):
        raise Returned(target[1])


@dataclass(frozen=True)
class Pending:
    """A message written whose confirm had not come when the publisher stopped waiting."""

    confirmation: asyncio.Future[Any]
    error: Unavailable


class MaybeStored(Unavailable):
    """A message written whose confirm did not come: RabbitMQ may store it yet, or not."""


def may_have_been_stored(
    what: str, blocked: str | None, seconds: float = PUBLISH_TIMEOUT
) -> Unavailable:
    """The error for a message written but not confirmed: RabbitMQ may store it yet, or not."""
    if blocked:
        why = f"RabbitMQ began blocking publishers ({blocked}) before confirming {what}"
    else:
        why = f"RabbitMQ did not confirm {what} within {seconds:g} s"
    return MaybeStored(
        f"{why}: the message may have been stored; retry with the same data only if "
        "duplicates are acceptable"
    )


async def _send(
    channel: aiormq.Channel, indexes: list[int], messages: Sequence[tuple[Target, Outgoing]]
) -> list[asyncio.Future[Any]]:
    try:
        return await bulk.send(channel, [_publish_of(*messages[i]) for i in indexes])
    except BROKER_ERRORS as error:
        return [_failed(error) for _ in indexes]


def bulk_deadline(count: int) -> float:
    """The most a bulk publish of count messages may take, everything included."""
    return PUBLISH_TIMEOUT * (4 + count / 50)


def _failed(error: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future


def _result_of(future: asyncio.Future[Any] | None, seconds: float, blocked: str | None) -> Any:
    if future is None and blocked:  # not sent: RabbitMQ began blocking first
        return Unavailable(
            f"RabbitMQ is blocking publishers ({blocked}); the message was not stored, try again"
        )
    if future is None:  # never handed to the connection: not sent
        return TimeoutError(f"RabbitMQ did not take the message within {seconds:g} s")
    if not future.done():
        return Pending(future, may_have_been_stored("publishing", blocked, seconds))
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception() or future.result()


def _outcome_of_result(result: Any) -> Outcome | None:
    """A confirmation's result as an Outcome; None: to be published again on its own (returned
    as unroutable, or lost when RabbitMQ closed its channel)."""
    if isinstance(result, Basic.Ack):
        return CONFIRMED
    if isinstance(result, bulk.Unmarshallable):
        return Outcome("refused", InvalidArgument(f"the message cannot be sent: {result}"))
    if isinstance(result, Pending):
        return Outcome("unavailable", result.error, result.confirmation)
    if isinstance(result, Unavailable):
        return Outcome("unavailable", result)
    if isinstance(result, REFUSALS) or not isinstance(result, BaseException):
        return None
    if isinstance(result, TimeoutError):
        return Outcome("unavailable", Unavailable(str(result)))
    return Outcome("unavailable", Unavailable(f"RabbitMQ is unavailable: {describe(result)}"))


def _rounds(indexes: list[int], messages: Sequence[tuple[Target, Outgoing]]) -> list[list[int]]:
    """Split message indexes so that no message id occurs twice in a round (a message retried in
    two queues at once, say): RabbitMQ returns an unroutable message by id, not by delivery tag."""
    rounds: list[list[int]] = []
    seen: dict[str, int] = {}
    for i in indexes:
        message_id = messages[i][1].properties.message_id
        n = seen.get(message_id, 0) if message_id else 0
        if message_id:
            seen[message_id] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(i)
    return rounds


def _publish_of(target: Target, message: Outgoing) -> bulk.Publish:
    kind, name = target
    return bulk.Publish(
        exchange=name if kind == "topic" else "",
        routing_key=name,
        mandatory=kind == "queue",
        body=message.body,
        properties=message.properties,
    )


async def finish_anyway(work: Awaitable[T]) -> T:
    """(asyncio side) Await work (bounded by its own deadline) in a task that a cancelled
    caller leaves running: aiormq closes the channel of an AMQP method cancelled midway, which
    would fail every other call on that channel, other clients' included."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Take the outcome of a task whose caller may have left, so asyncio does not report it."""
    if not task.cancelled():
        task.exception()


INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<name>[^']+)'.*?current is "
    r"(?:none|(?:the value )?'(?P<value>[^']*)'(?: of type '(?P<type>\w+)')?)"
)


def refused_argument(message: str) -> tuple[str, Any] | None:
    """From RabbitMQ's refusal of a declaration, the argument it names and the value the
    queue has for it (None: the queue has none); None when it names no argument. Only
    x-queue-type is reported with None whatever its value: the type is what is asked."""
    found = INEQUIVALENT.search(message)
    if found is None:
        return None
    name, value, kind = found["name"], found["value"], found["type"]
    if name == "x-queue-type" or value is None:
        return name, None
    if kind == "bool":
        return name, value == "true"
    if kind != "longstr" and re.fullmatch(r"-?\d+", value):
        return name, int(value)
    return name, value


def _other_settings(queue: str, arguments: dict[str, Any], error: CallError) -> str:
    wanted = ", ".join(["durable", *(f"{k}={v}" for k, v in arguments.items())])
    return (
        f"queue {queue!r} exists with other settings than the bus declares ({wanted}): "
        f"{error.message}; delete the queue (it is declared again on next use), or set "
        "amqp.queue_idle_expiry_seconds to match its x-expires"
    )


def type_mismatch(queue: str, wanted: str, internal: bool) -> str:
    """One line for a queue that exists as the other type than wanted: what and how to migrate."""
    other = "classic" if wanted == "quorum" else "quorum"
    what = f"queue {queue!r} exists as a {other} queue, but amqp.queue_type is {wanted}"
    if internal:
        how = (
            "it is one of the bus's own queues: stop every node, let its messages be written "
            f"(a node with amqp.queue_type {other} drains it) or shovel them away, delete it, "
            "and start again; or start with a new amqp.namespace"
        )
    else:
        how = (
            f"publish to a new {wanted} queue, move its messages into a {wanted} queue with a "
            f"shovel, or drain it and delete it (the bus declares it again as {wanted}); or set "
            f"amqp.queue_type back to {other}"
        )
    return f"{what}; RabbitMQ cannot change a queue's type in place: {how}"
