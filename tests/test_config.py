from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eventbus.config import Config, ConfigError, load

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def error_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text), environ or {})
    return str(caught.value)


def test_shipped_config_holds_exactly_the_defaults() -> None:
    assert load(str(ROOT / "config.toml"), {}) == Config()


def test_missing_keys_and_sections_take_defaults(tmp_path: Path) -> None:
    config = load(write(tmp_path, "[server]\ngrpc_port = 9999\n"), {})
    assert config.server.grpc_port == 9999
    assert config.server.http_port == 7878
    assert config.delivery.max_retries == 3
    assert config.amqp.namespace == "event_bus"


def test_spec_defaults() -> None:
    config = Config()
    assert (config.server.grpc_port, config.server.http_port) == (9091, 7878)
    assert config.server.max_message_bytes == 4194304
    assert (config.amqp.prefetch_count, config.amqp.consumers_per_queue) == (1000, 5)
    assert (config.amqp.producers_per_queue, config.amqp.reconnect_window_seconds) == (2, 60)
    assert config.redis.key_prefix == "event_bus:"
    assert config.delivery.ack_deadline_seconds == 1800
    assert config.delivery.nack_redelivery_delay_seconds == 600
    assert config.cron.interval_seconds == 1.0 and config.cron.lock_ttl_seconds == 1800
    assert config.background.workers == 20 and config.log.level == "info"


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    assert error_of(tmp_path, '[server]\ngrpc_port = "many"\n') == (
        'config.toml: server.grpc_port: expected an integer 1-65535, got "many"'
    )


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "[server]\ngrpc_port = 0\n",
            "config.toml: server.grpc_port: expected an integer 1-65535, got 0",
        ),
        (
            "[server]\ngrpc_port = 70000\n",
            "config.toml: server.grpc_port: expected an integer 1-65535, got 70000",
        ),
        (
            "[server]\ngrpc_port = 9.5\n",
            "config.toml: server.grpc_port: expected an integer 1-65535, got 9.5",
        ),
        (
            "[server]\ngrpc_port = true\n",
            "config.toml: server.grpc_port: expected an integer 1-65535, got true",
        ),
        (
            "[cron]\ninterval_seconds = 0\n",
            "config.toml: cron.interval_seconds: expected a number 0.05-3600, got 0",
        ),
        (
            '[cron]\nrepublish_enabled = "yes"\n',
            'config.toml: cron.republish_enabled: expected true or false, got "yes"',
        ),
        (
            '[log]\nlevel = "loud"\n',
            'config.toml: log.level: expected one of debug, info, warning, error, got "loud"',
        ),
        (
            '[amqp]\nurl = "http://x"\n',
            "config.toml: amqp.url: expected an amqp:// URL with a host (a / # ? in the "
            "password %-encoded), got a string of 8 characters (not shown: it may be secret)",
        ),
        (
            '[amqp]\nnamespace = ""\n',
            'config.toml: amqp.namespace: expected a name of 1-64 of A-Z a-z 0-9 _ . -, got ""',
        ),
        (
            "[delivery]\nmax_retries = -1\n",
            "config.toml: delivery.max_retries: expected an integer 0-1000, got -1",
        ),
        (
            "[background]\nworkers = 0\n",
            "config.toml: background.workers: expected an integer 1-1000, got 0",
        ),
        ("[server]\nport = 1\n", "config.toml: server.port: unknown key"),
        ("[servers]\ngrpc_port = 1\n", "config.toml: servers: unknown section"),
        ("server = 3\n", "config.toml: server: expected a table, got 3"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(tmp_path: Path, text: str, line: str) -> None:
    assert error_of(tmp_path, text) == line


def test_float_keys_accept_integers(tmp_path: Path) -> None:
    assert load(write(tmp_path, "[cron]\ninterval_seconds = 2\n"), {}).cron.interval_seconds == 2


def test_invalid_toml(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[server\n")
    assert message.startswith(f"{tmp_path / 'config.toml'}: invalid TOML:")
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(str(tmp_path / "nope.toml"), {})
    assert str(caught.value) == f"{tmp_path / 'nope.toml'}: cannot read: No such file or directory"


def test_environment_overrides_keys(tmp_path: Path) -> None:
    environ = {
        "EVENTBUS_SERVER__GRPC_PORT": "9555",
        "EVENTBUS_CRON__INTERVAL_SECONDS": "0.25",
        "EVENTBUS_CRON__REPUBLISH_ENABLED": "false",
        "EVENTBUS_AMQP__URL": "amqp://u:p@rabbit:5672/vh",
        "EVENTBUS_UNRELATED": "ignored",
        "HOME": "/root",
    }
    config = load(write(tmp_path, "[server]\ngrpc_port = 9000\n"), environ)
    assert config.server.grpc_port == 9555
    assert config.cron.interval_seconds == 0.25
    assert config.cron.republish_enabled is False
    assert config.amqp.url == "amqp://u:p@rabbit:5672/vh"


@pytest.mark.parametrize(
    ("environ", "line"),
    [
        (
            {"EVENTBUS_SERVER__GRPC_PORT": "many"},
            'EVENTBUS_SERVER__GRPC_PORT: server.grpc_port: expected an integer 1-65535, got "many"',
        ),
        ({"EVENTBUS_SERVER__NOPE": "1"}, "EVENTBUS_SERVER__NOPE: server.nope: unknown key"),
        ({"EVENTBUS_NOPE__X": "1"}, "EVENTBUS_NOPE__X: nope: unknown section"),
        (
            {"EVENTBUS_CRON__DELAY_PUBLISH_ENABLED": "maybe"},
            "EVENTBUS_CRON__DELAY_PUBLISH_ENABLED: cron.delay_publish_enabled: "
            'expected true or false, got "maybe"',
        ),
    ],
)
def test_bad_environment_overrides(tmp_path: Path, environ: dict[str, str], line: str) -> None:
    assert error_of(tmp_path, "", environ) == line


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventbus", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_reports_config_error_in_one_line_with_status_2(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\ngrpc_port = "many"\n')
    result = run_cli("serve", "--config", path)
    assert result.returncode == 2
    assert result.stderr == (
        'eventbus: config.toml: server.grpc_port: expected an integer 1-65535, got "many"\n'
    )
    assert "Traceback" not in result.stdout + result.stderr


def test_cli_missing_config_file(tmp_path: Path) -> None:
    result = run_cli("migrate", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0
    assert "absent.toml: cannot read" in result.stderr


def test_cli_version_and_help() -> None:
    from eventbus import __version__

    assert run_cli("--version").stdout.strip() == f"eventbus {__version__}"
    for args in (["--help"], ["serve", "--help"], ["migrate", "--help"]):
        result = run_cli(*args)
        assert result.returncode == 0 and "usage: eventbus" in result.stdout


def test_consumers_publishing_channels_and_streams_must_fit_one_connection(tmp_path: Path) -> None:
    fits = (
        "[server]\nmax_streaming_pulls = 290\n"
        "[amqp]\nmax_consumed_queues = 300\nconsumers_per_queue = 5\npublish_channels = 10\n"
    )
    assert load(write(tmp_path, fits), {}).amqp.max_consumed_queues == 300
    line = error_of(tmp_path, fits.replace("290", "291"))
    assert line == (
        "config.toml: amqp.max_consumed_queues: times amqp.consumers_per_queue, plus "
        "amqp.publish_channels and server.max_streaming_pulls, must be at most 1800 channels, "
        "got 300 x 5 + 10 + 291"
    )


def test_several_brokers_replace_the_one_url(tmp_path: Path) -> None:
    urls = ["amqp://guest:guest@h1:5672/", "amqps://guest:guest@h2:5671/"]
    config = load(write(tmp_path, f"[amqp]\nurls = {urls!r}\nurl_order = 'shuffled'\n"), {})
    assert config.amqp.brokers == tuple(urls)
    assert config.amqp.url_order == "shuffled"
    assert load(write(tmp_path, ""), {}).amqp.brokers == ("amqp://guest:guest@127.0.0.1:5672/",)


def test_broker_urls_from_the_environment_replace_the_files_url(tmp_path: Path) -> None:
    environ = {"EVENTBUS_AMQP__URLS": "amqp://h1:5672/ amqp://h2:5672/"}
    config = load(write(tmp_path, "[amqp]\nurl = 'amqp://old:5672/'\n"), environ)
    assert config.amqp.brokers == ("amqp://h1:5672/", "amqp://h2:5672/")
    environ = {"EVENTBUS_AMQP__URL": "amqp://one:5672/"}
    config = load(write(tmp_path, "[amqp]\nurls = ['amqp://h1:5672/']\n"), environ)
    assert config.amqp.brokers == ("amqp://one:5672/",)


def test_a_url_file_of_several_lines_names_several_brokers(tmp_path: Path) -> None:
    (tmp_path / "brokers").write_text("amqp://u:secret@h1:5672/\namqp://u:secret@h2:5672/\n")
    text = "[amqp]\nurl = 'amqp://guest:guest@127.0.0.1:5672/'\nurl_file = 'brokers'\n"
    config = load(write(tmp_path, text), {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.amqp.brokers == ("amqp://u:secret@h1:5672/", "amqp://u:secret@h2:5672/")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("[amqp]\nurls = []\n", "amqp.urls: expected at least one amqp:// URL, got []"),
        ("[amqp]\nurls = ['http://x/']\n", "amqp.urls: expected a list of at most 16"),
        ("[amqp]\nurls = 'amqp://x/'\n", "amqp.urls: expected a list of at most 16"),
        ("[amqp]\nurls = ['amqp://h1/', 'amqp://u:pa/ss@h2/']\n", "amqp.urls: expected a list"),
        ("[amqp]\nurls = ['amqp://u:pa#ss@h2/']\n", "amqp.urls: expected a list"),
        ("[amqp]\nurl = 'amqp://h:99999/'\n", "amqp.url: expected an amqp:// URL with a host"),
        ("[amqp]\nurl = 'amqp:///vhost'\n", "amqp.url: expected an amqp:// URL with a host"),
        (
            "[amqp]\nurls = ['amqp://x/']\nurl = 'amqp://y/'\n",
            "set amqp.url or amqp.urls, not both",
        ),
        ("[amqp]\nurl_order = 'random'\n", "amqp.url_order: expected one of in_order, shuffled"),
        ("[amqp]\nqueue_type = 'stream'\n", "amqp.queue_type: expected one of classic, quorum"),
        ("[http]\nui_enabled = 'yes'\n", "http.ui_enabled: expected true or false"),
    ],
)
def test_bad_broker_keys(tmp_path: Path, text: str, line: str) -> None:
    message = error_of(tmp_path, text)
    assert line in message
    assert "http://x/" not in message and "pa/ss" not in message  # may hold a password


def test_a_comma_in_a_broker_password_stays_in_its_url(tmp_path: Path) -> None:
    environ = {"EVENTBUS_AMQP__URLS": "amqp://u:a,b@h1:5672/ amqp://u:c@h2:5672/"}
    config = load(write(tmp_path, ""), environ)
    assert config.amqp.brokers == ("amqp://u:a,b@h1:5672/", "amqp://u:c@h2:5672/")


def test_the_admin_page_host_names_from_the_file_and_the_environment(tmp_path: Path) -> None:
    assert Config().http.ui_hosts == ()
    text = "[http]\nui_hosts = ['bus1.example.com', 'Bus-2', '10.0.0.7', '[fd00::7]']\n"
    config = load(write(tmp_path, text), {})
    assert config.http.ui_hosts == ("bus1.example.com", "Bus-2", "10.0.0.7", "[fd00::7]")
    environ = {"EVENTBUS_HTTP__UI_HOSTS": "ops.example.com localhost"}
    assert load(write(tmp_path, ""), environ).http.ui_hosts == ("ops.example.com", "localhost")


@pytest.mark.parametrize(
    "value",
    ["'bus1.example.com'", "['http://bus1/']", "['bus1:7878']", "['']", "[1]", "['a b']"],
)
def test_admin_page_host_names_are_names_alone(tmp_path: Path, value: str) -> None:
    assert error_of(tmp_path, f"[http]\nui_hosts = {value}\n").startswith(
        "config.toml: http.ui_hosts: expected a list of at most 64 host names"
    )
