"""The errors the client raises: every failed call becomes an RpcError carrying its gRPC status.

grpclib reports a failed call in several ways (GRPCError with the server's status, a stream torn
down, a refused connection, a timeout); `translated` turns each into one RpcError, in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError


class RpcError(Exception):
    """A call failed; `status` is its gRPC status code, `details` the server's message."""

    def __init__(self, status: Status, details: str) -> None:
        super().__init__(f"{status.name}: {details}")
        self.status = status
        self.details = details


class PublishError(RpcError):
    """The batch that carried this message failed; nothing says whether it was stored.
    Publishing it again with the same dedup_id stores it at most once."""


def as_rpc_error(error: BaseException) -> RpcError | None:
    """The RpcError that stands for a grpclib or network failure; None for anything else."""
    if isinstance(error, RpcError):
        return error
    if isinstance(error, GRPCError):
        return RpcError(error.status, error.message or "")
    if isinstance(error, asyncio.TimeoutError):  # before OSError: TimeoutError is one
        return RpcError(Status.DEADLINE_EXCEEDED, "the call's deadline passed")
    # ProtocolError: the stream broke in a way grpclib could not end cleanly (the server reset
    # it while our side was still open, say)
    if isinstance(error, StreamTerminatedError | ProtocolError | OSError):
        return RpcError(Status.UNAVAILABLE, str(error) or type(error).__name__)
    return None


@contextmanager
def translated() -> Iterator[None]:
    """Raise RpcError in place of grpclib's and the network's errors inside the block."""
    try:
        yield
    except Exception as error:
        rpc_error = as_rpc_error(error)
        if rpc_error is None or rpc_error is error:
            raise
        raise rpc_error from error
