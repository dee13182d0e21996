"""The process's open-file limit, raised to what the system allows, as Go's runtime does.

Every gRPC and HTTP connection holds a file descriptor; the usual soft limit (1024) is far below
what server.max_connections allows, and a daemon that runs out cannot accept, nor reach RabbitMQ,
PostgreSQL or Redis (EMFILE). The hard limit (LimitNOFILE= under systemd) is the real ceiling.
"""

from __future__ import annotations

import logging
import resource

logger = logging.getLogger(__name__)

# Descriptors kept for what is not a client connection: the broker, database and Redis pools,
# the HTTP port, logs, the event loop's own.
RESERVED = 256


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        logger.debug("open-file limit: %d (hard %s)", soft, hard)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as error:
        logger.warning("open-file limit: cannot raise %d to %d: %s", soft, hard, error)
        return soft
    logger.debug("open-file limit: raised from %d to %d", soft, hard)
    return hard


def check_connection_budget(limit: int, max_connections: int) -> None:
    """Warn when server.max_connections cannot be reached within the open-file limit."""
    if max_connections + RESERVED > limit:
        logger.warning(
            "open-file limit %d leaves room for %d gRPC connections, fewer than "
            "server.max_connections %d; raise LimitNOFILE",
            limit,
            max(0, limit - RESERVED),
            max_connections,
        )
