"""Errors that mean something to the daemon as a whole."""


class FatalError(Exception):
    """The daemon cannot go on; the message is the one line it exits with."""


class DependencyUnavailable(FatalError):
    """RabbitMQ, PostgreSQL or Redis did not answer within the allowed window."""
