from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from eventbus.backends.retry import connect_within, describe, redact
from eventbus.errors import DependencyUnavailable


class FlakyServer:
    """Refuses the first `failures` connects, then answers."""

    def __init__(self, failures: int, error: BaseException | None = None) -> None:
        self.failures = failures
        self.error = error or ConnectionRefusedError(111, "Connection refused")
        self.attempts: list[float] = []

    async def connect(self) -> str:
        self.attempts.append(trio.current_time())
        if len(self.attempts) <= self.failures:
            raise self.error
        return "connection"


async def test_succeeds_after_transient_failures(autojump_clock: trio.testing.MockClock) -> None:
    server = FlakyServer(failures=3)
    result = await connect_within("RabbitMQ", "amqp://h", server.connect, 60, (OSError,))
    assert result == "connection"
    gaps = [b - a for a, b in zip(server.attempts, server.attempts[1:], strict=False)]
    assert gaps == pytest.approx([0.2, 0.4, 0.8])


async def test_gives_up_after_the_window_with_one_line(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    server = FlakyServer(failures=10_000)
    caplog.set_level(logging.WARNING)
    with pytest.raises(DependencyUnavailable) as caught:
        await connect_within("Redis", "redis://127.0.0.1:1", server.connect, 30, (OSError,))
    assert str(caught.value) == (
        "Redis at redis://127.0.0.1:1 did not answer within 30 s: "
        "ConnectionRefusedError: [Errno 111] Connection refused"
    )
    assert server.attempts[-1] <= 30
    assert len(caplog.records) == len(server.attempts) - 1  # one warning per failed retry
    assert "attempt 1" in caplog.records[0].getMessage()


async def test_attempt_that_hangs_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async def hang() -> None:
        await trio.sleep_forever()

    start = trio.current_time()
    with pytest.raises(DependencyUnavailable, match="timed out"):
        await connect_within("PostgreSQL", "pg", hang, 12, (OSError,))
    assert trio.current_time() - start == pytest.approx(12, abs=5.5)


async def test_non_transient_error_is_raised_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FlakyServer(failures=1, error=PermissionError("bad password"))
    with pytest.raises(PermissionError):
        await connect_within("PostgreSQL", "pg", server.connect, 60, (ConnectionError,))
    assert len(server.attempts) == 1


def test_redact_hides_password_only() -> None:
    assert redact("amqp://guest:secret@host:5672/vh") == "amqp://guest:***@host:5672/vh"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    # asyncpg and redis-py also take a password in the query
    assert (
        redact("postgresql://bus@db/bus?password=S3CRET&sslmode=verify-full&sslpassword=K")
        == "postgresql://bus@db/bus?password=***&sslmode=verify-full&sslpassword=***"
    )


def test_describe() -> None:
    assert describe(trio.TooSlowError()) == "timed out"
    assert describe(OSError("boom\nsecond line")) == "OSError: boom"
    assert describe(TimeoutError()) == "TimeoutError"
