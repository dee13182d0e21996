"""Which PostgreSQL failures mean PostgreSQL (or the way to it) is out of order for now: the
caller waits and retries (UNAVAILABLE to a client), rather than blaming the rows or answering
INTERNAL.

asyncpg raises a few of them from classes outside PostgresError and InterfaceError: a pooled
connection whose server died under it can be left in the middle of an operation, and the next
statement on it fails with InternalClientError ("cannot switch to state 11; another operation
(2) is in progress"), which derives from Exception alone. Such a connection is broken for good:
it is closed rather than given back to the pool (see store.on_writable).
"""

from __future__ import annotations

import asyncpg
from asyncpg.exceptions._base import InternalClientError

# The connection itself is unusable: closed under a call, or its protocol state broken.
BROKEN_CONNECTION: tuple[type[BaseException], ...] = (
    InternalClientError,
    asyncpg.ConnectionDoesNotExistError,
)

# PostgreSQL failing, whatever was asked of it: an outage to wait out (where row errors are
# not told apart from it, as in the dedup and ledger calls of the request path).
OUTAGE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    *BROKEN_CONNECTION,
)
