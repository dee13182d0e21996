"""Errors that mean something beyond the line that raised them.

FatalError ends the daemon with its one-line message. CallError and its kinds are expected
failures of a client's call; the gRPC gate answers each with its status code (in one place).
"""

from grpclib.const import Status


class FatalError(Exception):
    """The daemon cannot go on; the message is the one line it exits with."""


class DependencyUnavailable(FatalError):
    """RabbitMQ, PostgreSQL or Redis did not answer within the allowed window."""


class CallError(Exception):
    """An expected failure of a call, answered with its status code and message."""

    status = Status.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CallError):
    status = Status.INVALID_ARGUMENT


class Unavailable(CallError):
    status = Status.UNAVAILABLE


class FailedPrecondition(CallError):
    status = Status.FAILED_PRECONDITION


class QueueTypeMismatch(FailedPrecondition):
    """A queue exists with another type (classic or quorum) than amqp.queue_type declares:
    RabbitMQ cannot change a queue's type in place, so an operator must migrate it."""


class ResourceExhausted(CallError):
    status = Status.RESOURCE_EXHAUSTED


class NotFound(CallError):
    """A queue that does not exist, where the bus must not create it (server.auto_create_queues
    false)."""

    status = Status.NOT_FOUND


class Unauthenticated(CallError):
    """No credentials, or credentials no identity holds."""

    status = Status.UNAUTHENTICATED


class PermissionDenied(CallError):
    """An identity asked for something its permissions do not cover."""

    status = Status.PERMISSION_DENIED
