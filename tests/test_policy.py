"""Per-queue retry policies: the [queues."GLOB"] tables of config.toml as loaded and refused, which
policy a queue follows, and the pure retry decisions (backoff, jitter, dead letter), with the
[delivery] default keeping the bus's fixed behaviour."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventbus.config import Config, ConfigError, DeliveryConfig, QueuePolicyConfig, load
from eventbus.delivery.policy import (
    CACHE_SIZE,
    Cause,
    Policies,
    Policy,
    default_policy,
    is_dead,
    retry_delay,
)
from eventbus.jobs.ledger import DueDelivery
from eventbus.jobs.republish import plan

ORDERS = """
[queues."orders.*"]
ack_deadline_seconds = 30
max_retries = 10
backoff_min_seconds = 1
backoff_max_seconds = 600
dead_letter_queue = "orders.dead"
"""


def load_text(text: str, environ: dict[str, str] | None = None) -> Config:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.toml"
        path.write_text(text)
        return load(str(path), environ or {})


def error_of(text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_text(text, environ)
    return str(caught.value)


def never() -> float:
    raise AssertionError("the default policy draws no jitter")


# --- configuration -------------------------------------------------------------------------------


def test_spec_example_loads_as_written() -> None:
    (orders,) = load_text(ORDERS).queues
    assert orders == QueuePolicyConfig("orders.*", 30, 10, 1, 600, "orders.dead")


def test_no_queue_tables_by_default() -> None:
    assert Config().queues == ()
    assert load_text("").queues == ()


def test_tables_keep_file_order_across_other_sections() -> None:
    text = (
        '[queues."b.*"]\nmax_retries = 1\n[server]\ngrpc_port = 9100\n'
        '[queues."a.*"]\nmax_retries = 2\n[queues]\n"c" = { max_retries = 3 }\n'
    )
    config = load_text(text)
    assert [(q.glob, q.max_retries) for q in config.queues] == [("b.*", 1), ("a.*", 2), ("c", 3)]
    assert config.server.grpc_port == 9100


def test_keys_left_out_take_delivery_values_and_defaults() -> None:
    text = '[delivery]\nmax_retries = 7\n[queues."x"]\n'
    config = load_text(text, {"EVENTBUS_DELIVERY__ACK_DEADLINE_SECONDS": "45"})
    assert config.queues == (QueuePolicyConfig("x", 45, 7, 1.0, 600.0, None),)


def test_dedup_window_default_and_range() -> None:
    assert Config().delivery.dedup_window_seconds == 600
    assert load_text("[delivery]\ndedup_window_seconds = 604800\n").delivery == DeliveryConfig(
        dedup_window_seconds=604800
    )
    for bad in (0, 604801):
        assert error_of(f"[delivery]\ndedup_window_seconds = {bad}\n") == (
            f"config.toml: delivery.dedup_window_seconds: expected an integer 1-604800, got {bad}"
        )


NAME_RULE = "a queue name of 1-255 bytes of A-Z a-z 0-9 - _ . : @ # , / + and space"
GLOB_RULE = (
    "expected a glob of queue names: 1-255 of A-Z a-z 0-9 - _ . : @ # , / + and space, "
    "or the wildcards * ? [...] [!...]"
)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            '[queues."orders.*"]\nmax_retries = "x"\n',
            'config.toml: queues."orders.*".max_retries: expected an integer 0-1000, got "x"',
        ),
        (
            '[queues."orders.*"]\nmax_retries = 1001\n',
            'config.toml: queues."orders.*".max_retries: expected an integer 0-1000, got 1001',
        ),
        (
            '[queues."o"]\nack_deadline_seconds = 0\n',
            'config.toml: queues."o".ack_deadline_seconds: expected an integer 1-604800, got 0',
        ),
        (
            '[queues."o"]\nack_deadline_seconds = 1.5\n',
            'config.toml: queues."o".ack_deadline_seconds: expected an integer 1-604800, got 1.5',
        ),
        (
            '[queues."o"]\nbackoff_min_seconds = -1\n',
            'config.toml: queues."o".backoff_min_seconds: expected a number 0-604800, got -1',
        ),
        (
            '[queues."o"]\nbackoff_max_seconds = true\n',
            'config.toml: queues."o".backoff_max_seconds: expected a number 0-604800, got true',
        ),
        (
            '[queues."o"]\nbackoff_min_seconds = 10\nbackoff_max_seconds = 5\n',
            'config.toml: queues."o".backoff_min_seconds: expected at most backoff_max_seconds '
            "(5), got 10",
        ),
        (
            '[queues."o"]\nbackoff_min_seconds = 700\n',
            'config.toml: queues."o".backoff_min_seconds: expected at most backoff_max_seconds '
            "(600.0), got 700",
        ),
        ('[queues."o"]\nmax_retry = 3\n', 'config.toml: queues."o".max_retry: unknown key'),
        ('[queues."o".extra]\nx = 1\n', 'config.toml: queues."o".extra: unknown key'),
        ("queues = 3\n", "config.toml: queues: expected a table, got 3"),
        ('[queues]\n"o" = 3\n', 'config.toml: queues."o": expected a table, got 3'),
        ('[queues.""]\n', f'config.toml: queues."": {GLOB_RULE}'),
        ('[queues."orders["]\n', f'config.toml: queues."orders[": {GLOB_RULE}'),
        ('[queues."or]ders"]\n', f'config.toml: queues."or]ders": {GLOB_RULE}'),
        ('[queues."ordé"]\n', f'config.toml: queues."ordé": {GLOB_RULE}'),
        (f'[queues."{"[ab]" * 256}*"]\n', f'config.toml: queues."{"[ab]" * 256}*": {GLOB_RULE}'),
        (
            '[queues."amq.*"]\n',
            'config.toml: queues."amq.*": must not start with amq. (reserved by RabbitMQ)',
        ),
        (
            '[queues."event_bus.*"]\n',
            'config.toml: queues."event_bus.*": must not be inside amqp.namespace "event_bus"',
        ),
        (
            '[queues."o"]\ndead_letter_queue = ""\n',
            f'config.toml: queues."o".dead_letter_queue: expected {NAME_RULE}, got ""',
        ),
        (
            '[queues."o"]\ndead_letter_queue = "o*"\n',
            f'config.toml: queues."o".dead_letter_queue: expected {NAME_RULE}, got "o*"',
        ),
        (
            f'[queues."o"]\ndead_letter_queue = "{"d" * 256}"\n',
            f'config.toml: queues."o".dead_letter_queue: expected {NAME_RULE}, got "{"d" * 256}"',
        ),
        (
            '[queues."o"]\ndead_letter_queue = 5\n',
            f'config.toml: queues."o".dead_letter_queue: expected {NAME_RULE}, got 5',
        ),
        (
            '[queues."o"]\ndead_letter_queue = "amq.dead"\n',
            'config.toml: queues."o".dead_letter_queue: must not start with amq. '
            "(reserved by RabbitMQ)",
        ),
        (
            '[amqp]\nnamespace = "bus"\n[queues."o"]\ndead_letter_queue = "bus.dead"\n',
            'config.toml: queues."o".dead_letter_queue: must not be inside amqp.namespace "bus"',
        ),
    ],
)
def test_bad_queue_tables_give_one_line_naming_the_key(text: str, line: str) -> None:
    assert error_of(text) == line


def test_longest_glob_and_dead_letter_queue_are_taken() -> None:
    text = f'[queues."{"[ab]" * 255}*"]\ndead_letter_queue = "{"d" * 255}"\n'
    (table,) = load_text(text).queues
    assert table.dead_letter_queue == "d" * 255


def test_namespace_from_the_environment_is_checked_too() -> None:
    text = '[queues."o"]\ndead_letter_queue = "ns.dead"\n'
    assert error_of(text, {"EVENTBUS_AMQP__NAMESPACE": "ns"}) == (
        'config.toml: queues."o".dead_letter_queue: must not be inside amqp.namespace "ns"'
    )


def test_queue_tables_are_not_set_from_the_environment() -> None:
    assert error_of("", {"EVENTBUS_QUEUES__MAX_RETRIES": "3"}) == (
        'EVENTBUS_QUEUES__MAX_RETRIES: queues: set in the file only, as [queues."GLOB"] tables'
    )


def quoted(text: str) -> str:
    """text as a TOML basic string."""
    plain = " .*?[]!-_"
    return '"' + "".join(c if c.isalnum() or c in plain else f"\\U{ord(c):08x}" for c in text) + '"'


TOML_SCALARS = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str)
    | st.floats(allow_nan=False, allow_infinity=False).map(repr)
    | st.booleans().map(lambda b: str(b).lower())
    | st.text(max_size=12).map(quoted)
)
KEYS = st.sampled_from(
    [
        "ack_deadline_seconds",
        "max_retries",
        "backoff_min_seconds",
        "backoff_max_seconds",
        "dead_letter_queue",
        "x",
    ]
)


@given(
    st.lists(
        st.tuples(st.text(max_size=12), st.dictionaries(KEYS, TOML_SCALARS, max_size=5)),
        max_size=4,
        unique_by=lambda t: t[0],
    )
)
def test_random_queue_tables_load_or_give_one_line(
    tables: list[tuple[str, dict[str, str]]],
) -> None:
    text = "".join(
        f"[queues.{quoted(glob)}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
        for glob, keys in tables
    )
    try:
        config = load_text(text)
    except ConfigError as error:
        assert str(error).startswith("config.toml: queues")
        assert "\n" not in str(error)
    else:
        assert [q.glob for q in config.queues] == [glob for glob, _ in tables]
        for q in config.queues:
            assert 0 <= q.backoff_min_seconds <= q.backoff_max_seconds


# --- which policy a queue follows ----------------------------------------------------------------


def config_with(*tables: QueuePolicyConfig) -> Config:
    return Config(delivery=DeliveryConfig(max_retries=4), queues=tables)


def test_first_matching_glob_wins_in_file_order() -> None:
    specific = QueuePolicyConfig("orders.eu.*", max_retries=1)
    broad = QueuePolicyConfig("orders.*", max_retries=2)
    policies = Policies(config_with(specific, broad))
    assert policies.for_queue("orders.eu.new").max_retries == 1
    assert policies.for_queue("orders.us.new").max_retries == 2
    reversed_order = Policies(config_with(broad, specific))
    assert reversed_order.for_queue("orders.eu.new").max_retries == 2


def test_queues_matching_no_glob_follow_delivery() -> None:
    policies = Policies(config_with(QueuePolicyConfig("orders.*", dead_letter_queue="dead")))
    assert policies.for_queue("payments").glob is None
    assert policies.for_queue("payments") == policies.default
    assert policies.default == default_policy(DeliveryConfig(max_retries=4))
    assert policies.for_queue("orders.x").dead_letter_queue == "dead"


@pytest.mark.parametrize(
    ("glob", "name", "matches"),
    [
        ("orders.*", "orders.eu.new", True),  # * crosses dots
        ("orders.*", "orders", False),
        ("Orders.*", "orders.x", False),  # case-sensitive
        ("q?", "q1", True),
        ("q[0-9]", "qa", False),
        ("q[!0-9]", "qa", True),
        ("*", "anything at all", True),
    ],
)
def test_glob_matching(glob: str, name: str, matches: bool) -> None:
    policies = Policies(config_with(QueuePolicyConfig(glob)))
    assert (policies.for_queue(name).glob == glob) is matches


def test_lookups_are_remembered_within_a_bound() -> None:
    policies = Policies(config_with(QueuePolicyConfig("a.*", max_retries=9)))
    for i in range(CACHE_SIZE + 50):
        assert policies.for_queue(f"a.{i}").max_retries == 9
    assert policies._lookup.cache_info().currsize == CACHE_SIZE
    assert policies.for_queue("b").max_retries == 4


# --- retry decisions -----------------------------------------------------------------------------

ORDERS_POLICY = Policy(30, 10, backoff_min_seconds=1, backoff_max_seconds=600, glob="orders.*")


def test_backoff_doubles_then_stays_at_the_cap() -> None:
    delays = [retry_delay(ORDERS_POLICY, n, "nack", lambda: 0.5) for n in range(1, 14)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600, 600]


def test_backoff_is_the_same_for_a_missed_deadline() -> None:
    for attempt in (1, 5, 30):
        nack = retry_delay(ORDERS_POLICY, attempt, "nack", lambda: 0.5)
        assert retry_delay(ORDERS_POLICY, attempt, "deadline", lambda: 0.5) == nack


def test_jitter_extremes() -> None:
    assert retry_delay(ORDERS_POLICY, 3, "nack", lambda: 0.0) == pytest.approx(3.6)
    assert retry_delay(ORDERS_POLICY, 3, "nack", lambda: 0.999999) == pytest.approx(4.4, 1e-5)
    assert retry_delay(ORDERS_POLICY, 20, "deadline", lambda: 0.0) == pytest.approx(540)


def test_huge_attempts_stay_at_the_cap() -> None:
    big = Policy(1, 1000, backoff_min_seconds=604800, backoff_max_seconds=604800)
    assert retry_delay(big, 5000, "nack", lambda: 0.5) == 604800
    zero = Policy(1, 1000, backoff_min_seconds=0, backoff_max_seconds=0)
    assert retry_delay(zero, 5000, "nack", lambda: 0.9) == 0


@given(
    st.floats(min_value=0, max_value=604800),
    st.floats(min_value=0, max_value=604800),
    st.integers(min_value=1, max_value=1001),
    st.floats(min_value=0, max_value=1, exclude_max=True),
    st.sampled_from(get_args(Cause)),
)
def test_jitter_stays_within_ten_percent_of_the_capped_backoff(
    low: float, high: float, attempt: int, drawn: float, cause: Cause
) -> None:
    low, high = min(low, high), max(low, high)
    policy = Policy(30, 1000, backoff_min_seconds=low, backoff_max_seconds=high)
    nominal = min(low * 2 ** (attempt - 1), high)
    delay = retry_delay(policy, attempt, cause, lambda: drawn)
    assert nominal * 0.9 - 1e-9 <= delay <= nominal * 1.1 + 1e-9
    assert delay <= high * 1.1 + 1e-9


@given(st.integers(min_value=1, max_value=1000))
def test_backoff_never_shrinks_from_one_attempt_to_the_next(attempt: int) -> None:
    first = retry_delay(ORDERS_POLICY, attempt, "nack", lambda: 0.5)
    assert retry_delay(ORDERS_POLICY, attempt + 1, "nack", lambda: 0.5) >= first


@given(st.integers(min_value=0, max_value=7 * 86400), st.integers(min_value=1, max_value=1001))
def test_default_policy_keeps_the_fixed_delays(nack_delay: int, attempt: int) -> None:
    default = default_policy(DeliveryConfig(nack_redelivery_delay_seconds=nack_delay))
    assert retry_delay(default, attempt, "nack", never) == nack_delay
    assert retry_delay(default, attempt, "deadline", never) == 0


def test_default_policy_takes_delivery_keys() -> None:
    delivery = DeliveryConfig(max_retries=5, ack_deadline_seconds=90)
    default = default_policy(delivery)
    assert (default.ack_deadline_seconds, default.max_retries) == (90, 5)
    assert default.dead_letter_queue is None and default.glob is None


def test_dead_after_max_retries_plus_one_deliveries() -> None:
    assert [is_dead(ORDERS_POLICY, n) for n in (1, 10, 11, 12)] == [False, False, True, True]
    zero = Policy(30, 0)
    assert is_dead(zero, 1)


@given(st.integers(min_value=0, max_value=1000), st.integers(min_value=1, max_value=1002))
def test_default_dead_letter_rule_matches_the_republish_plan(
    max_retries: int, attempt: int
) -> None:
    due = DueDelivery("d", "m", "q", b"x", attempt, None, datetime.now(UTC))
    planned = plan([due], 0.0, max_retries).outcomes["d"]
    default = default_policy(DeliveryConfig(max_retries=max_retries))
    assert is_dead(default, attempt) is (planned == "dead")
