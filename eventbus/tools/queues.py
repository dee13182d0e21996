"""`eventbus queues` and `eventbus purge`: queue counts and purges through a running daemon's
eventbus.v2.Admin service (an identity with admin = true when auth is on)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .._generated import v2_pb2
from ..client import Client
from ..client.errors import translated
from . import output, progress, remote

COLUMNS = ("ready", "in_flight", "delayed", "dead_letters", "consumers")


def add_commands(commands: Any) -> None:
    summary = (
        "list queues: ready, in flight, delayed, dead letters, consumers (every queue the bus "
        "keeps state for, or the ones named)"
    )
    listing: argparse.ArgumentParser = commands.add_parser(
        "queues", help=summary, description=summary
    )
    listing.add_argument("names", nargs="*", metavar="QUEUE", help="only these queues")
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    remote.add_options(listing)
    listing.set_defaults(remote=list_queues)

    summary = "remove the ready messages of queues (not those handed out, delayed or dead)"
    purge: argparse.ArgumentParser = commands.add_parser("purge", help=summary, description=summary)
    purge.add_argument("names", nargs="+", metavar="QUEUE")
    progress.add_option(purge)
    remote.add_options(purge)
    purge.set_defaults(remote=purge_queues)


async def queue_infos(client: Client, names: Sequence[str] = ()) -> list[Any]:
    """(asyncio side) The QueueInfo of each named queue (NotFound fails the call), or of every
    queue ListQueues knows."""
    admin = client.admin
    with translated():
        if not names:
            reply = await admin.ListQueues(v2_pb2.ListQueuesRequest(), timeout=client.timeout)
            return list(reply.queues)
        return [
            await admin.GetQueue(v2_pb2.GetQueueRequest(queue=name), timeout=client.timeout)
            for name in names
        ]


async def list_queues(target: remote.Remote, args: argparse.Namespace) -> int:
    infos = await remote.with_client(target, lambda client: queue_infos(client, args.names))
    if args.json:
        for info in infos:
            fields = {"queue": info.name} | {column: getattr(info, column) for column in COLUMNS}
            print(output.line(fields, as_json=True))
    elif infos:
        headers = ["QUEUE", *(column.upper() for column in COLUMNS)]
        rows = [[info.name, *(getattr(info, column) for column in COLUMNS)] for info in infos]
        print(output.table(headers, rows))
    return remote.EXIT_OK


async def purge_queues(target: remote.Remote, args: argparse.Namespace) -> int:
    """Purge each queue in turn, a line each; a bar over the queues on a terminal."""
    names = list(dict.fromkeys(args.names))

    async def purge_each(client: Client) -> None:
        admin = client.admin
        with progress.bar("purging", quiet=args.quiet, total=len(names)) as bar:
            for done, name in enumerate(names):
                bar.describe(f"purging {name}")
                with translated():
                    request = v2_pb2.PurgeQueueRequest(queue=name)
                    reply = await admin.PurgeQueue(request, timeout=target.timeout)
                print(f"{name}\t{reply.purged} purged", file=sys.stdout, flush=True)
                bar(done + 1, len(names))
            bar.describe("purged")

    await remote.with_client(target, purge_each)
    return remote.EXIT_OK
