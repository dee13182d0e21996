"""The daemon: one trio task tree that starts every part in order and stops them in reverse.

serve
└── root nursery: signals (SIGHUP reloads config.toml), sd_notify
    ├── trio-asyncio loop (opened around the nursery)
    ├── PostgreSQL pool (migrations applied at start)
    ├── Redis client
    ├── RabbitMQ supervisor (reconnects within the window, else the daemon exits)
    └── work nursery (stopped before the connections close)
        ├── consumers per queue, bookkeeping workers, rebalance watcher
        ├── crons: republish, delay (Redis lock per tick, row claims in PostgreSQL)
        ├── gRPC server: mq.Mq, mq.MqTopic, health, reflection
        ├── HTTP server: /healthz /readyz /metrics /stats, /ui (admin page, when on)
        └── gauges, heap trimming, node registration, watchdog keep-alive, loop-lag watch
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import time
from functools import partial
from typing import Any

import trio

from . import __version__, ui
from .api import http, rpc, v2
from .api.admin import AdminService
from .api.h2limits import limits_of
from .api.v1 import MqService, MqTopicService, SizeLimitedCodec
from .api.v2 import Subscriptions
from .backends import aio, broker, lock, store
from .backends.lock import RedisLock
from .backends.retry import describe
from .config import Config, ConfigError
from .config import load as load_config
from .delivery.batches import BatchPublishing
from .delivery.consumer import Consumers
from .delivery.dedup import Dedup, forget_expired_forever
from .delivery.ids import DeliveryIds
from .delivery.operations import LEDGER_TIMEOUT, Delivery
from .delivery.policy import Policies
from .delivery.publisher import Publisher
from .delivery.rebalance import Rebalancer
from .delivery.redelivery import Redelivery
from .errors import FatalError, QueueTypeMismatch, Unavailable
from .jobs import admin, bookkeeping
from .jobs.cron import Cron
from .jobs.delay import Dispatcher
from .jobs.republish import Republisher, RetryRules
from .ops import fdlimit, lag, nodes, reload
from .ops.gauges import Gauges
from .ops.history import History
from .ops.memory import give_back_freed_memory
from .ops.metrics import Metrics, label_values
from .ops.notify import Notifier
from .ops.supervise import Supervisor
from .security.access import Access
from .security.quotas import Quotas
from .security.tls import ServerTls, TlsError

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class Daemon:
    """One running eventbus node."""

    def __init__(
        self, config: Config, notifier: Notifier | None = None, config_path: str | None = None
    ) -> None:
        self.config = config  # the running configuration: a reload changes its live keys
        self.config_path = config_path  # read again on SIGHUP
        self.node = config.server.node
        self.metrics = Metrics(self.node)
        self.notifier = notifier or Notifier()
        self.started_at = time.time()
        self.ready = False
        self.stop_requested = trio.Event()
        self.http_stopped = trio.Event()
        self.access = Access(config.auth)
        self.quotas = Quotas(config.auth.identities, self.metrics)  # update() on reload
        # TLS on the gRPC port, its files read now so a bad one stops the start at once
        self.tls = ServerTls(config.tls, config.auth.mode) if config.tls.enabled else None
        self.gate = rpc.Gate(self.metrics, config.server.max_concurrent_calls, self.access)
        self.supervisor = Supervisor(self.metrics)
        self.crons: list[Cron] = []
        self.reload_pending = False  # SIGHUP while starting: reload once ready

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT (graceful stop) or a fatal error (raised); SIGHUP reloads."""
        open_files = fdlimit.raise_open_file_limit()
        fdlimit.check_connection_budget(open_files, self.config.server.max_connections)
        async with (
            aio.open_loop(self.metrics.stray_asyncio_errors.inc),
            trio.open_nursery() as root,
        ):
            root.start_soon(self._watch_signals, root.cancel_scope)
            await self._connect(root)
            # The work stops before the connections close, so the crons can give up their
            # locks and the consumers hand their messages back.
            async with trio.open_nursery() as work:
                await self._start(work)
                self._announce_ready()
                if self.reload_pending:
                    self._reload()
                await self.stop_requested.wait()
                await self._stop()
                work.cancel_scope.cancel()
            root.cancel_scope.cancel()
        logger.info("eventbus: node %s stopped", self.node)

    async def _connect(self, root: trio.Nursery) -> None:
        """PostgreSQL, Redis and RabbitMQ, in that order, each supervised by root."""
        cfg = self.config
        window = cfg.amqp.reconnect_window_seconds
        self.store = await root.start(store.run, cfg.postgres, window)
        self.redis = await root.start(lock.run, cfg.redis, window)
        self.broker = await root.start(broker.run, cfg.amqp, self.metrics)

    def _announce_ready(self) -> None:
        self._warn_when_open()
        self.ready = True
        self.notifier.send("READY=1")
        server = self.config.server
        logger.info(
            "eventbus %s: node %s ready: gRPC on %s:%d, HTTP on %s:%d",
            __version__,
            self.node,
            server.grpc_host,
            server.grpc_port,
            server.http_host,
            server.http_port,
        )

    def _warn_when_open(self) -> None:
        """Anyone who can reach a non-loopback port may then do anything: say so, once."""
        server, mode = self.config.server, self.config.auth.mode
        if is_loopback(server.grpc_host):
            return
        if mode == "off":
            logger.warning(
                "eventbus: auth.mode is off and gRPC listens on %s: anyone who reaches port %d "
                "may publish, take, ack and manage every queue (see Security in the README)",
                server.grpc_host,
                server.grpc_port,
            )
        elif mode in ("token", "any") and not self.config.tls.enabled:
            logger.warning(
                "eventbus: tokens travel in clear: gRPC on %s:%d has no TLS (set tls.cert_file "
                "and tls.key_file)",
                server.grpc_host,
                server.grpc_port,
            )

    async def _start(self, root: trio.Nursery) -> None:
        """Everything that serves or works, on top of the connections."""
        cfg = self.config
        auto_create = cfg.server.auto_create_queues
        self.publisher = Publisher(self.broker, cfg.amqp, auto_create_queues=auto_create)
        self.consumers = Consumers(
            self.broker, cfg.amqp, self.metrics, self.supervisor, self.publisher.declare_queue, root
        )
        self.queues = admin.Queues(  # counts for the v2 Admin service and the admin page
            self.store,
            self.broker,
            self.consumers,
            cfg.amqp.namespace,
            self.metrics.queue_label.seen,
        )
        self.delivery_ids = delivery_ids = await DeliveryIds.load(self.store)
        delivery_ids.owners = lambda: self.gate.access.identities if self.gate.access else ()
        self.policies = Policies(cfg)  # every queue's retry policy, for each path alike
        self.delivery = Delivery(
            cfg,
            self.broker,
            self.publisher,
            self.consumers,
            self.metrics,
            delivery_ids,
            self.store.asyncio_side(LEDGER_TIMEOUT),
            self.policies,
        )
        for queue in self.delivery.internal.all():
            try:
                await self.publisher.declare_queue(queue)
            except QueueTypeMismatch as mismatch:
                raise FatalError(f"eventbus: cannot start: {mismatch.message}") from None
        self._start_background(root)
        # grpclib binds to the running asyncio loop when built, so only now.
        services = self._services()
        codec = SizeLimitedCodec(cfg.server.max_message_bytes)
        self.grpc = rpc.GrpcServer(
            services, self.gate, codec, limits_of(cfg.server), reflection=cfg.server.reflection
        )
        tls = self.tls.context if self.tls else None
        await root.start(rpc.run, self.grpc, cfg.server.grpc_host, cfg.server.grpc_port, tls)
        pages = self._admin_page(root) if cfg.http.ui_enabled else []
        app = http.make_app(
            self._readiness_checks(), self.metrics, self.stats, lambda: self.gate.access, pages
        )
        await root.start(self._serve_http, app)
        supervise = self.supervisor.forever
        root.start_soon(supervise, "nodes", partial(nodes.keep_registered, self.store, self.node))
        root.start_soon(supervise, "watchdog", self.notifier.keep_alive)
        root.start_soon(supervise, "lag", partial(lag.watch, self.metrics))
        root.start_soon(supervise, "dedup", partial(forget_expired_forever, self.dedup))

    def _admin_page(self, root: trio.Nursery) -> list[Any]:
        """/ui's routes, and the sampler of the rates it draws (from now on)."""
        history = History(self.metrics)
        root.start_soon(self.supervisor.forever, "history", history.run)
        namespace = self.config.amqp.namespace
        queues = self.queues
        parts = ui.Parts(
            self.node,
            self.metrics,
            self.store,
            self.publisher,
            queues,
            self.policies,
            namespace,
            history,
            self.stats,
            self._readiness_checks(),
            lambda: self.gate.access,
            hosts=(self.config.server.http_host, *self.config.http.ui_hosts),
        )
        return ui.routes(parts)

    def _services(self) -> list[Any]:
        """The gRPC services, v1 and v2, served on one port."""
        cfg = self.config
        self.dedup = Dedup(
            self.store.asyncio_side(LEDGER_TIMEOUT), cfg.delivery.dedup_window_seconds
        )
        publishing = BatchPublishing(cfg, self.publisher, self.dedup, self.metrics)
        redelivery = Redelivery(cfg, self.policies, self.publisher, self.delivery_ids)
        self.subscriptions = Subscriptions(
            cfg, self.broker, self.publisher, self.delivery, redelivery, self.metrics
        )
        return [
            MqService(self.gate, self.delivery, self.quotas),
            MqTopicService(self.gate, self.delivery, self.quotas),
            v2.PublisherService(self.gate, publishing, self.quotas),
            v2.SubscriberService(self.gate, self.subscriptions, self.quotas),
            AdminService(
                self.gate, self.store, self.publisher, self.queues, self.config.amqp.namespace
            ),
        ]

    def _start_background(self, root: trio.Nursery) -> None:
        """Bookkeeping workers, the crons, the gauges and the heap trimming, as this node's
        configuration asks."""
        cfg = self.config
        internal = self.delivery.internal
        supervise = self.supervisor.forever
        if cfg.background.enabled:
            root.start_soon(
                supervise,
                "bookkeeping",
                partial(
                    bookkeeping.run,
                    self.broker,
                    self.store,
                    self.metrics,
                    internal,
                    cfg.background.workers,
                    self.publisher.queue_arguments(internal=True),
                ),
            )
        republisher = Republisher(
            self.store,
            self.publisher,
            cfg.delivery,
            self.metrics,
            cfg.cron.claim_seconds,
            settlements_queue=internal.ack,
            rules=RetryRules.of(cfg, self.policies),
        )
        dispatcher = Dispatcher(
            self.store,
            self.publisher,
            self.metrics,
            cfg.cron.claim_seconds,
            cfg.cron.interval_seconds,
        )
        jobs: list[tuple[str, bool, Republisher | Dispatcher]] = [
            ("republish", cfg.cron.republish_enabled, republisher),
            ("delay", cfg.cron.delay_publish_enabled, dispatcher),
        ]
        self.metrics.redis_degraded.set_function(lambda: 0.0 if self.redis.health.ok else 1.0)
        for name, enabled, job in jobs:
            if enabled:
                lock_ = RedisLock(self.redis, name, cfg.cron.lock_ttl_seconds)
                cron = Cron(
                    name,
                    job.tick,
                    lock_,
                    cfg.cron.interval_seconds,
                    cfg.cron.lock_ttl_seconds,
                    upkeep=job.settle_unconfirmed,
                )
                root.start_soon(supervise, f"cron {name}", cron.run)
                self.crons.append(cron)
        rebalancer = Rebalancer(
            self.node,
            self.broker,
            self.publisher,
            self.consumers,
            f"{cfg.amqp.namespace}.rebalance",
            self.metrics,
        )
        root.start_soon(supervise, "rebalance", rebalancer.run)
        self.gauges = Gauges(
            self.metrics, self.store, self.publisher, self.consumers, internal.all()
        )
        root.start_soon(supervise, "gauges", self.gauges.run)
        root.start_soon(supervise, "memory", give_back_freed_memory)

    async def _serve_http(
        self, app: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        server = self.config.server
        try:
            await http.run(
                app,
                server.http_host,
                server.http_port,
                self.stop_requested,
                tls=self.tls.context if self.tls and self.config.tls.http else None,
                task_status=task_status,
            )
        finally:
            self.http_stopped.set()

    async def _stop(self) -> None:
        self.notifier.send("STOPPING=1")
        logger.info("eventbus: stopping node %s", self.node)
        await self.grpc.stop(self.config.server.shutdown_grace_seconds)
        with trio.move_on_after(http.GRACEFUL_TIMEOUT + 1):
            await self.http_stopped.wait()

    async def _watch_signals(self, root_scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self._reload_when_ready()
                    continue
                if self.stop_requested.is_set():
                    logger.warning(
                        "eventbus: second %s; exiting at once", signal.Signals(signum).name
                    )
                    os._exit(128 + signum)
                logger.info("eventbus: %s received; stopping", signal.Signals(signum).name)
                self.stop_requested.set()
                if not self.ready:
                    root_scope.cancel()  # still starting: nothing to drain

    def _reload_when_ready(self) -> None:
        if self.stop_requested.is_set():
            logger.info("eventbus: SIGHUP received while stopping; not reloading")
        elif not self.ready:
            logger.info("eventbus: SIGHUP received while starting; reloading once ready")
            self.reload_pending = True
        else:
            self._reload()

    def _reload(self) -> None:
        """Read config.toml again and apply what can change live, telling systemd (RELOADING=1,
        then READY=1). A file that fails validation, or TLS files that cannot be used, change
        nothing; neither connections nor calls in flight are touched."""
        self.reload_pending = False
        if self.config_path is None:
            logger.warning("reload: this daemon was given no configuration file to read again")
            return
        self.notifier.reloading()
        try:
            self._apply(load_config(self.config_path))
        except (ConfigError, TlsError) as error:
            logger.error("reload refused: %s; the running configuration stays", error)
        except Exception:
            logger.exception("reload: failed part-way; restart to be sure of the configuration")
        finally:
            self.notifier.send("READY=1")

    def _apply(self, new: Config) -> None:
        """Take new's live keys (TLS first: its files may still be refused), name the rest."""
        live = reload.live_keys(new, tls_running=self.tls is not None)
        result = reload.plan(self.config, new, live)
        running = result.config
        if self.tls is not None and new.tls.enabled:
            self.tls.reload(running.tls, running.auth.mode)  # read again even when unchanged
        self.access = self.gate.access = Access(running.auth)
        self._end_revoked_streams()
        self.quotas.update(running.auth.identities)  # buckets carry their tokens over
        self.policies.replace(running)
        reload.set_log_level(running.log.level)
        for cron in self.crons:
            cron.set_interval(running.cron.interval_seconds)
        self.config = running
        reload.report(result)
        self._warn_when_open()

    def _end_revoked_streams(self) -> None:
        """Streams whose identity the new configuration removed, or no longer lets read their
        queue, end now (their messages go back to the queue); other calls in flight finish."""
        access = self.access
        ended = self.subscriptions.streams.revoke(
            lambda s: access.refusal(s.identity, s.queue, s.topic)
        )
        if ended:
            logger.info("reload: ended %d streams whose identity may no longer read", ended)

    def _readiness_checks(self) -> dict[str, http.Check]:
        async def grpc_serving() -> None:
            if self.gate.draining:
                raise Unavailable("gRPC is shutting down")

        return {
            "rabbitmq": self.broker.ping,
            "postgresql": self.store.ping,
            "redis": self.redis.readiness,  # slow or down: degraded, the crons use row claims
            "grpc": grpc_serving,
        }

    async def stats(self) -> dict[str, Any]:
        """The /stats document: this node, its calls, queues, dependencies and live peers."""
        try:
            with trio.fail_after(http.CHECK_TIMEOUT):
                peers: list[dict[str, Any]] | str = await nodes.alive(self.store)
        except Exception as error:
            peers = f"unavailable: {describe(error)}"
        return {
            "node": self.node,
            "version": __version__,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "grpc": {
                "in_flight": self.gate.in_flight,
                "draining": self.gate.draining,
                "calls": label_values(self.metrics.grpc_requests),
            },
            "rabbitmq": {
                "connected": self.broker.connected,
                "broker": self.broker.address,  # the one connected to, or last tried
                "failovers": sum(label_values(self.metrics.broker_failovers).values()),
                "connections": self.broker.connection_states(),
                "blocked": self.broker.blocked,
                "reconnects": label_values(self.metrics.reconnects),
            },
            "redis": self.redis.health.as_dict(),
            "stray_asyncio_errors": sum(label_values(self.metrics.stray_asyncio_errors).values()),
            "queues": self.gauges.per_queue(),
            "background_backlog": self.gauges.backlog,
            "nodes": peers,
        }
