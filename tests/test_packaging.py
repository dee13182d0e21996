"""What ships beside the code: generated gRPC modules and the systemd unit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "eventbus" / "_generated"


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_protos.py"), str(tmp_path)],
        check=True,
        timeout=120,
    )
    fresh = sorted(p.name for p in tmp_path.iterdir())
    assert fresh == [
        "mq_grpc.py",
        "mq_pb2.py",
        "mq_pb2.pyi",
        "v2_grpc.py",
        "v2_pb2.py",
        "v2_pb2.pyi",
    ]
    for name in fresh:
        assert (tmp_path / name).read_text() == (GENERATED / name).read_text(), name


def test_proto_keeps_the_v1_contract() -> None:
    from eventbus._generated import mq_pb2

    fields = {
        name: [(f.name, f.number) for f in message.fields]
        for name, message in mq_pb2.DESCRIPTOR.message_types_by_name.items()
    }
    assert fields["PublishRequest"] == [("queue", 1), ("data", 2), ("ExpirationSeconds", 3)]
    assert fields["DelayPublishRequest"] == [
        ("queue", 1),
        ("data", 2),
        ("delaySeconds", 3),
        ("ExpirationSeconds", 4),
    ]
    assert fields["SubscribeResponse"] == [("id", 1), ("data", 2), ("queue", 3)]
    assert fields["TopicSubscribeRequest"] == [("topic", 1), ("queueName", 2)]
    assert fields["DelayTopicPublishRequest"] == [
        ("topic", 1),
        ("data", 2),
        ("delaySeconds", 3),
        ("ExpirationSeconds", 4),
    ]
    assert mq_pb2.DESCRIPTOR.package == "mq"
    for service in ("Mq", "MqTopic"):
        methods = [m.name for m in mq_pb2.DESCRIPTOR.services_by_name[service].methods]
        assert methods == ["publish", "delayPublish", "subscribe", "ack", "nack"]


needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit_with_real_binary(tmp_path: Path) -> Path:
    """The shipped unit, pointed at this checkout's eventbus so verify can check ExecStart."""
    text = (ROOT / "systemd" / "eventbus.service").read_text()
    binary = Path(sys.executable).parent / "eventbus"
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={binary}", text, flags=re.M)
    unit = tmp_path / "eventbus.service"
    unit.write_text(text)
    return unit


@needs_systemd
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit_with_real_binary(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


@needs_systemd
def test_systemd_unit_is_hardened(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit_with_real_binary(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert score, result.stdout + result.stderr
    assert float(score[1]) <= 1.5


def test_systemd_unit_is_notify_type_and_restarts() -> None:
    text = (ROOT / "systemd" / "eventbus.service").read_text()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "WatchdogSec=30",
        "ExecStart=/opt/eventbus/.venv/bin/eventbus serve --config /etc/eventbus/config.toml",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, flags=re.M), line


def test_the_wheel_carries_every_file_the_daemon_reads(tmp_path: Path) -> None:
    """Migrations, the admin page's static files and the typing markers, in a built wheel
    (a non-editable install has nothing else)."""
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("eventbus-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        "eventbus/ui/static/ui.css",
        "eventbus/ui/static/ui.js",
        "eventbus/py.typed",
        "eventbus/backends/migrations/0001_nodes.sql",
    }
    assert shipped <= names
    migrations = {p.name for p in (ROOT / "eventbus/backends/migrations").glob("*.sql")}
    assert {n.rsplit("/", 1)[1] for n in names if n.endswith(".sql")} == migrations
