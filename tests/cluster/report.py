"""The checker tables of this pytest run, printed as each run ends and again in the summary."""

from __future__ import annotations

from tests.cluster.checker import Report

TABLES: list[str] = []


def record(report: Report) -> None:
    table = report.table()
    TABLES.append(table)
    print("\n" + table, flush=True)
