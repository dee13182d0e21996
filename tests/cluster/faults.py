"""The fault steps of the scenarios and how one scenario runs: the cluster made whole, the
workload run with the steps, the checker's report recorded."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tests.cluster import checker, report, workload
from tests.cluster.history import History
from tests.cluster.workload import Queues, Shape, Step

if TYPE_CHECKING:
    from scripts.cluster import Cluster, RabbitNode


@dataclass
class Run:
    history: History
    report: checker.Report
    queue_types: dict[str, str]  # each queue of the run: its type in RabbitMQ

    def confirmed_after(self, when: float) -> int:
        """Messages first confirmed after when (seconds into the run)."""
        return sum(
            1
            for m in self.history.messages.values()
            if m.confirmed_at is not None and m.confirmed_at > when
        )

    def mark_ended(self, prefix: str) -> float:
        """When the first fault step whose name starts with prefix returned."""
        return next(m.ended for m in self.history.marks if m.name.startswith(prefix))


def addresses(cluster: Cluster) -> list[tuple[str, int]]:
    return [("127.0.0.1", daemon.grpc_port) for daemon in cluster.daemons]


def connected_node(cluster: Cluster) -> RabbitNode:
    """The RabbitMQ node most daemons are connected to (the first node when none says)."""
    names = Counter(d.connected_broker(cluster.rabbits) for d in cluster.daemons)
    for name, _ in names.most_common():
        for node in cluster.rabbits:
            if node.name == name and node.running:
                return node
    return cluster.rabbits[0]


def queue_types(cluster: Cluster, queues: Queues) -> dict[str, str]:
    """The type RabbitMQ gives each of the workload's queues (classic or quorum)."""
    from scripts.cluster import rabbitmqctl

    node = next(n for n in cluster.rabbits if n.running)
    listed = rabbitmqctl(node.name, "list_queues", "name", "type", "--formatter", "json")
    found = {entry["name"]: entry["type"] for entry in json.loads(listed)}
    return {name: found.get(name, "missing") for name in (queues.v1, queues.v2)}


def make_whole(cluster: Cluster) -> None:
    """Every RabbitMQ node running and every daemon ready (what an earlier scenario took down
    is started again)."""
    for node in cluster.rabbits:
        if not node.running:
            node.start()
    for daemon in cluster.daemons:
        daemon.start()


def run_scenario(cluster: Cluster, name: str, steps: list[Step], shape: Shape | None = None) -> Run:
    """The workload against every daemon of cluster while steps run; its report printed."""
    make_whole(cluster)
    shape = shape or Shape()
    queues = Queues(f"fault.{name}.v1", f"fault.{name}.v2")
    history = workload.run(addresses(cluster), queues, shape, steps)
    title = f"{cluster.queue_type} queues: {name}"
    verdict = checker.check(history, title)
    verdict.notes += [f"t={m.began:.1f}-{m.ended:.1f} s: {m.name}" for m in history.marks] + [
        f"load {shape.load_seconds:g} s, publishing ended at {history.publish_ended:.1f} s, "
        f"drained at {history.drain_ended:.1f} s"
    ]
    types = queue_types(cluster, queues)
    verdict.notes.append("queue types: " + ", ".join(f"{q} {t}" for q, t in types.items()))
    report.record(verdict)
    return Run(history, verdict, types)


class Faults:
    """Fault steps against one cluster; what a step took down is remembered for the step that
    brings it back."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.down: list[RabbitNode] = []

    def kill_connected_rabbit(self) -> str:
        node = connected_node(self.cluster)
        node.kill()
        self.down.append(node)
        return f"SIGKILL RabbitMQ {node.name} (the daemons' node)"

    def stop_two_rabbits(self) -> str:
        first = connected_node(self.cluster)
        second = next(n for n in self.cluster.rabbits if n is not first)
        for node in (first, second):
            node.stop()
            self.down.append(node)
        return f"stopped RabbitMQ {first.name} and {second.name} (1 of 3 left: no quorum)"

    def start_one_rabbit(self) -> str:
        node = self.down.pop(0)
        node.start()
        return f"started RabbitMQ {node.name}"

    def kill_pg_primary(self) -> str:
        self.cluster.pg_primary.kill()
        return f"SIGKILL PostgreSQL primary :{self.cluster.pg_primary.port}"

    def promote_standby(self) -> str:
        self.cluster.pg_standby.promote()
        return f"promoted PostgreSQL standby :{self.cluster.pg_standby.port}"

    def kill_daemon(self, index: int) -> str:
        daemon = self.cluster.daemons[index]
        daemon.kill()
        return f"SIGKILL daemon {index + 1} (grpc :{daemon.grpc_port})"

    def start_daemon(self, index: int) -> str:
        self.cluster.daemons[index].start()
        return f"started daemon {index + 1}"

    def steps_kill_rabbit(self, at: float = 8, back: float = 18) -> list[Step]:
        return [
            Step(at, "kill", self.kill_connected_rabbit),
            Step(back, "restart", self.start_one_rabbit),
        ]
