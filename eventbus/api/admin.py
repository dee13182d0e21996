"""The v2 gRPC service eventbus.v2.Admin: queues, dead letters and delayed messages.

Each method only translates between protobuf messages and the operations of eventbus.jobs.admin
(which the command line uses too); they run on the trio side of the seam, and the gate around
them maps their errors to status codes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from .._generated import v2_grpc, v2_pb2
from ..backends import aio
from ..backends.store import Store
from ..delivery.publisher import Publisher
from ..errors import Unavailable
from ..jobs import admin
from ..jobs.deadletters import DeadLetter
from ..jobs.delay import Pending
from ..security.access import Permission, require, target_of
from .rpc import Gate

ACTIONS = {"RequeueDeadLetters", "CancelDelayed", "PurgeQueue"}  # what changes something: logged
Request = TypeVar("Request")
Reply = TypeVar("Reply")


def _time(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _queue_info(info: admin.QueueInfo) -> v2_pb2.QueueInfo:
    return v2_pb2.QueueInfo(
        name=info.name,
        ready=info.ready,
        in_flight=info.in_flight,
        delayed=info.delayed,
        dead_letters=info.dead_letters,
        consumers=info.consumers,
    )


def _dead_letter(letter: DeadLetter) -> v2_pb2.DeadLetter:
    return v2_pb2.DeadLetter(
        queue=letter.queue,
        message_id=letter.message_id,
        data=letter.body,
        attempts=letter.attempts,
        last_failure_time=_time(letter.last_failure_at),
        dead_time=_time(letter.dead_at),
        reason=letter.reason or "",
    )


def _delayed(row: Pending) -> v2_pb2.DelayedMessage:
    return v2_pb2.DelayedMessage(
        message_id=row.id,
        queue=row.target if row.kind == "queue" else "",
        topic=row.target if row.kind == "topic" else "",
        data=row.body,
        due_time=_time(row.due_at),
    )


class AdminService(v2_grpc.AdminBase):
    """Inspection and repair of queues, for operators and their tools."""

    def __init__(
        self,
        gate: Gate,
        store: Store,
        publisher: Publisher,
        queues: admin.Queues,
        namespace: str,
    ) -> None:
        self._gate = gate
        self._store = store
        self._publisher = publisher
        self._namespace = namespace
        self._queues = queues

    async def _unary(
        self, stream: Any, method: str, work: Callable[[Request], Awaitable[Reply]]
    ) -> None:
        crossing = aio.run_trio(work)
        name = f"eventbus.v2.Admin/{method}"

        async def allowed(request: Request) -> Reply:
            identity = require(Permission.ADMIN)
            if method in ACTIONS:
                self._gate.audit_action(
                    stream,
                    name,
                    identity,
                    target_of(getattr(request, "queue", ""), getattr(request, "message_ids", ())),
                )
            return await crossing(request)

        await self._gate.unary(stream, name, allowed)

    async def GetQueue(self, stream: Any) -> None:
        await self._unary(stream, "GetQueue", self._get_queue)

    async def ListQueues(self, stream: Any) -> None:
        await self._unary(stream, "ListQueues", self._list_queues)

    async def ListDeadLetters(self, stream: Any) -> None:
        await self._unary(stream, "ListDeadLetters", self._list_dead_letters)

    async def RequeueDeadLetters(self, stream: Any) -> None:
        await self._unary(stream, "RequeueDeadLetters", self._requeue_dead_letters)

    async def ListDelayed(self, stream: Any) -> None:
        await self._unary(stream, "ListDelayed", self._list_delayed)

    async def CancelDelayed(self, stream: Any) -> None:
        await self._unary(stream, "CancelDelayed", self._cancel_delayed)

    async def PurgeQueue(self, stream: Any) -> None:
        await self._unary(stream, "PurgeQueue", self._purge_queue)

    async def _get_queue(self, request: v2_pb2.GetQueueRequest) -> v2_pb2.QueueInfo:
        return _queue_info(await self._queues.info(request.queue))

    async def _list_queues(self, _request: v2_pb2.ListQueuesRequest) -> v2_pb2.ListQueuesResponse:
        infos = await self._queues.known()
        return v2_pb2.ListQueuesResponse(queues=[_queue_info(i) for i in infos])

    async def _list_dead_letters(
        self, request: v2_pb2.ListDeadLettersRequest
    ) -> v2_pb2.ListDeadLettersResponse:
        letters = await admin.list_dead_letters(
            self._store,
            self._namespace,
            request.queue,
            admin.page_size(request.limit),
            request.offset,
        )
        return v2_pb2.ListDeadLettersResponse(dead_letters=[_dead_letter(d) for d in letters])

    async def _requeue_dead_letters(
        self, request: v2_pb2.RequeueDeadLettersRequest
    ) -> v2_pb2.RequeueDeadLettersResponse:
        moved, kept = await admin.requeue_dead_letters(
            self._store, self._publisher, self._namespace, request.queue, request.message_ids
        )
        if kept:
            raise Unavailable(
                f"{moved} dead letters requeued; {kept} could not be (RabbitMQ did not take "
                "them) and stay"
            )
        return v2_pb2.RequeueDeadLettersResponse(requeued=moved)

    async def _list_delayed(self, request: v2_pb2.ListDelayedRequest) -> v2_pb2.ListDelayedResponse:
        target = admin.delayed_target(request.queue, request.topic, self._namespace)
        limit = admin.page_size(request.limit)
        rows = await admin.list_delayed(self._store, target, limit, request.offset)
        return v2_pb2.ListDelayedResponse(delayed=[_delayed(row) for row in rows])

    async def _cancel_delayed(
        self, request: v2_pb2.CancelDelayedRequest
    ) -> v2_pb2.CancelDelayedResponse:
        cancelled, not_found = await admin.cancel_delayed(self._store, request.message_ids)
        return v2_pb2.CancelDelayedResponse(cancelled=cancelled, not_found=not_found)

    async def _purge_queue(self, request: v2_pb2.PurgeQueueRequest) -> v2_pb2.PurgeQueueResponse:
        return v2_pb2.PurgeQueueResponse(purged=await self._queues.purge(request.queue))
