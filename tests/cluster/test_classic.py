"""Classic queues under the same broker fault: what they lose is recorded, not asserted (a
classic queue lives on one node: its messages are unavailable while that node is down). Yet the
answers must say so: UNAVAILABLE while the queue's node is down, never NOT_FOUND (a client
takes NOT_FOUND as final and drops the message) nor INTERNAL."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.cluster.faults import Faults, run_scenario

if TYPE_CHECKING:
    from scripts.cluster import Cluster


def test_kill_connected_rabbitmq_node_classic(classic_cluster: Cluster) -> None:
    """SIGKILL the node the daemons (and the classic queues) are on; it comes back 10 s later
    with its disk."""
    faults = Faults(classic_cluster)
    run = run_scenario(classic_cluster, "kill-rabbit", faults.steps_kill_rabbit())
    report = run.report
    assert set(run.queue_types.values()) == {"classic"}, run.queue_types
    assert report.counts["all"].confirmed > 0, report.table()
    assert report.unexpected == 0, report.table()
    assert not report.wrong, report.table()
