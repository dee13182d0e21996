"""Fault scenarios on a cluster of quorum queues: no confirmed message may be lost."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.cluster.faults import Faults, Run, run_scenario
from tests.cluster.workload import Step

if TYPE_CHECKING:
    from scripts.cluster import Cluster


def assert_nothing_lost(run: Run) -> None:
    report = run.report
    assert set(run.queue_types.values()) == {"quorum"}, run.queue_types
    assert report.counts["all"].confirmed > 0, report.table()
    assert report.lost == 0, report.table()
    assert report.counts["all"].lost_in_fault == 0, report.table()
    assert report.unexpected == 0, report.table()
    assert not report.wrong, report.table()


def test_kill_connected_rabbitmq_node(quorum_cluster: Cluster) -> None:
    """SIGKILL the node the daemons are connected to under load; it comes back 10 s later."""
    faults = Faults(quorum_cluster)
    run = run_scenario(quorum_cluster, "kill-rabbit", faults.steps_kill_rabbit())
    assert_nothing_lost(run)
    assert run.confirmed_after(run.mark_ended("kill")) > 0, run.report.table()


def test_two_of_three_rabbitmq_nodes_down(quorum_cluster: Cluster) -> None:
    """Two nodes stopped: no quorum, publishes answer errors and nothing answered OK is lost;
    once one node is back, traffic resumes."""
    faults = Faults(quorum_cluster)
    steps = [
        Step(8, "no-quorum", faults.stop_two_rabbits),
        Step(18, "quorum-back", faults.start_one_rabbit),
        Step(20, "third-back", faults.start_one_rabbit),
    ]
    run = run_scenario(quorum_cluster, "no-quorum", steps)
    assert_nothing_lost(run)
    assert run.confirmed_after(run.mark_ended("quorum-back")) > 0, run.report.table()


def test_kill_one_daemon(quorum_cluster: Cluster) -> None:
    """SIGKILL one of three daemons; its clients move to the others; it is restarted later."""
    faults = Faults(quorum_cluster)
    steps = [
        Step(8, "kill-daemon", lambda: faults.kill_daemon(1)),
        Step(20, "daemon-back", lambda: faults.start_daemon(1)),
    ]
    run = run_scenario(quorum_cluster, "kill-daemon", steps)
    assert_nothing_lost(run)
    assert run.confirmed_after(run.mark_ended("kill-daemon")) > 0, run.report.table()


def test_postgres_primary_killed_and_standby_promoted(quorum_cluster: Cluster) -> None:
    """SIGKILL the PostgreSQL primary, promote the standby 4 s later (last: the old primary
    stays down)."""
    faults = Faults(quorum_cluster)
    steps = [
        Step(8, "kill-primary", faults.kill_pg_primary),
        Step(12, "promote", faults.promote_standby),
    ]
    run = run_scenario(quorum_cluster, "pg-failover", steps)
    assert_nothing_lost(run)
    assert run.confirmed_after(run.mark_ended("promote")) > 0, run.report.table()
