import logging

import pytest

from eventbus.ops.ratelog import MAX_KINDS, RateLimitedLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_kind_per_interval_then_the_count_of_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    log = RateLimitedLog(logging.getLogger("ratelog-test"), 60.0, clock)
    with caplog.at_level(logging.WARNING, "ratelog-test"):
        assert log.warning("refused", "refused %s", "a")
        assert not log.warning("refused", "refused %s", "b")
        assert not log.warning("refused", "refused %s", "c")
        assert log.warning("other", "other kind")
        clock.now += 61
        assert log.warning("refused", "refused %s", "d")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused a", "other kind", "refused d (2 more like it in the last 61 s)"]


def test_kinds_remembered_are_bounded() -> None:
    log = RateLimitedLog(logging.getLogger("ratelog-test"), 60.0, FakeClock())
    for i in range(MAX_KINDS * 3):
        log.info(f"kind {i}", "line")
    assert len(log._last) == MAX_KINDS
