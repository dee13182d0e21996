"""The config loader on random documents, bytes and environments: a Config or one ConfigError
line, never anything else."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from eventbus.config import SECTIONS, Config, ConfigError, load

KEYS = {name: [f.name for f in dataclasses.fields(kind)] for name, kind in SECTIONS.items()}
SECTION_NAMES = st.sampled_from([*SECTIONS, "servers", "x"])


def key_of(section: str) -> st.SearchStrategy[str]:
    return st.sampled_from([*KEYS.get(section, []), "unknown_key"]) | st.text(max_size=8)


SCALARS = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.text(max_size=20)
    | st.datetimes()
    | st.dates()
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return value.isoformat()  # dates and datetimes


@st.composite
def documents(draw: st.DrawFn) -> str:
    lines = []
    for section in draw(st.lists(SECTION_NAMES, max_size=4, unique=True)):
        lines.append(f"[{json.dumps(section)}]")
        for key in draw(st.lists(key_of(section), max_size=4, unique=True)):
            lines.append(f"{json.dumps(key)} = {toml_value(draw(VALUES))}")
    return "\n".join(lines) + "\n"


@contextmanager
def config_file(data: bytes) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "config.toml")
        with open(path, "wb") as file:
            file.write(data)
        yield path


def load_or_config_error(data: bytes, environ: dict[str, str]) -> Config | ConfigError:
    with config_file(data) as path:
        try:
            return load(path, environ)
        except ConfigError as error:
            assert "\n" not in str(error).strip()
            return error


@settings(max_examples=300, deadline=None)
@given(documents())
def test_random_documents_load_or_give_one_config_error(text: str) -> None:
    load_or_config_error(text.encode("utf-8", "surrogatepass"), {})


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("latin-1", "replace"))
)
def test_random_bytes_load_or_give_one_config_error(data: bytes) -> None:
    load_or_config_error(data, {})


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    environ = {}
    for section in draw(st.lists(SECTION_NAMES, max_size=3)):
        key = draw(key_of(section))
        value = draw(st.text(max_size=30) | st.integers().map(str) | st.floats().map(str))
        environ[f"EVENTBUS_{section.upper()}__{key.upper()}"] = value
    return environ


@settings(max_examples=300, deadline=None)
@given(environments())
def test_random_environment_overrides_load_or_give_one_config_error(
    environ: dict[str, str],
) -> None:
    result = load_or_config_error(b"", environ)
    assert isinstance(result, Config | ConfigError)


def test_a_file_that_is_not_utf8_is_one_line_naming_the_byte() -> None:
    error = load_or_config_error('[server]\nnode_name = "café"\n'.encode("latin-1"), {})
    assert isinstance(error, ConfigError)
    assert str(error).endswith("not UTF-8 text: byte 0xe9 at offset 25")


def test_arrays_nested_too_deeply_are_one_line() -> None:
    error = load_or_config_error(b"a = " + b"[" * 5000 + b"]" * 5000, {})
    assert isinstance(error, ConfigError) and "nested too deeply" in str(error)
