"""`eventbus token new NAME`, run as a user runs it: the token it prints once, and the lines
it prints for config.toml, which load as they are and admit that token alone."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from eventbus.cli import main
from eventbus.config import load
from eventbus.errors import Unauthenticated
from eventbus.security.access import Access


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventbus", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def new_token(name: str) -> tuple[str, str]:
    """The token and the config.toml lines `eventbus token new name` prints."""
    done = run_cli("token", "new", name)
    assert done.returncode == 0, done.stderr
    return token_and_table(done.stdout)


def token_and_table(output: str) -> tuple[str, str]:
    lines = output.splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("[auth.identities."))
    return lines[1], "\n".join(lines[table:]) + "\n"


def paste(tmp_path: Path, *tables: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('[auth]\nmode = "token"\n\n' + "\n".join(tables))
    return path


@pytest.mark.parametrize("name", ["orders-service", "orders.v1"])
def test_printed_lines_load_and_admit_the_printed_token(tmp_path: Path, name: str) -> None:
    token, table = new_token(name)
    assert len(token) >= 43 and token.replace("-", "").replace("_", "").isalnum()
    config = load(str(paste(tmp_path, table)), environ={})
    (identity,) = config.auth.identities
    assert identity.name == name
    assert identity.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert (identity.publish, identity.subscribe, identity.admin) == ((), (), False)
    access = Access(config.auth)
    assert access.authenticate({"authorization": f"Bearer {token}"}, None).name == name
    with pytest.raises(Unauthenticated):
        access.authenticate({"authorization": f"Bearer {token}x"}, None)


@pytest.mark.parametrize("name", ["a", "A_b-9" * 12 + "abcd", "v1.2"])
def test_any_name_config_takes_gets_lines_that_load(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "new", name]) == 0
    token, table = token_and_table(capsys.readouterr().out)
    config = load(str(paste(tmp_path, table)), environ={})
    assert [identity.name for identity in config.auth.identities] == [name]
    assert Access(config.auth).authenticate({"authorization": f"Bearer {token}"}, None).name == name


def test_every_token_is_new(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "new", "one"]) == 0
    first, first_table = token_and_table(capsys.readouterr().out)
    assert main(["token", "new", "two"]) == 0
    second, second_table = token_and_table(capsys.readouterr().out)
    assert first != second
    config = load(str(paste(tmp_path, first_table, second_table)), environ={})
    access = Access(config.auth)
    assert access.authenticate({"authorization": f"Bearer {first}"}, None).name == "one"
    assert access.authenticate({"authorization": f"Bearer {second}"}, None).name == "two"


def test_the_token_is_printed_once_and_never_written_in_the_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["token", "new", "auditor"]) == 0
    printed = capsys.readouterr()
    token = printed.out.splitlines()[1]
    assert printed.out.count(token) == 1
    assert printed.err == ""


@pytest.mark.parametrize("name", ["bad name", "", "a/b", "x" * 65, "naïve", "a]b"])
def test_a_name_config_would_refuse_is_refused(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["token", "new", name])
    assert exited.value.code == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert "token new: NAME must be 1-64 of A-Z a-z 0-9 _ . -" in printed.err
    assert repr(name) in printed.err


def test_a_missing_name_is_a_usage_error() -> None:
    done = run_cli("token", "new")
    assert done.returncode == 2
    assert "NAME" in done.stderr and done.stdout == ""


def test_token_new_needs_no_config_file(tmp_path: Path) -> None:
    """It reads nothing: it works where no config.toml exists."""
    done = subprocess.run(
        [sys.executable, "-m", "eventbus", "token", "new", "ops"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "[auth.identities.ops]" in done.stdout
