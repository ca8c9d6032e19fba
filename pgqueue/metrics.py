"""Every Prometheus metric pgqueue exports, defined in one place, and the HTTP endpoint
that serves ``/metrics`` and ``/healthz`` for a daemon.

Label sets are bounded: queue, task (tasks a worker does not know are reported as
"unknown"), outcome. Never job ids. With ``--processes N`` the children write their
samples to PROMETHEUS_MULTIPROC_DIR and the supervisor serves the sum.
Database-wide gauges (queue depth, oldest ready job, dead jobs, live workers) are
collected from the database by the reaper and by workers (unless ``--no-queue-stats``),
cached between scrapes.
"""

from __future__ import annotations

import functools
import io
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, TypeVar

import psycopg
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pgqueue import __version__, store
from pgqueue.errors import ConfigError
from pgqueue.log import get_logger
from pgqueue.migrate import schema_drift

log: Any = get_logger("pgqueue.metrics")

DEFAULT_METRICS_HOST = "0.0.0.0"
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

JOBS_CLAIMED = Counter("pgqueue_jobs_claimed", "Jobs claimed by workers.", ["queue", "task"])
JOBS_COMPLETED = Counter(
    "pgqueue_jobs_completed",
    "Attempts finished, by outcome: succeeded, retried (failed, will run again), dead"
    " (dead-lettered), failed (failed, not retried: cancelled), cancelled (snoozed or"
    " released after a cancel: cancelled), snoozed, released (returned at shutdown),"
    " lease_lost (result discarded: the lease was taken over).",
    ["queue", "task", "outcome"],
)
JOB_DURATION = Histogram(
    "pgqueue_job_duration_seconds",
    "Handler run time per attempt.",
    ["queue", "task"],
    buckets=DURATION_BUCKETS,
)
JOBS_RUNNING = Gauge(
    "pgqueue_jobs_running",
    "Handlers running now in this worker (summed over processes).",
    ["queue"],
    multiprocess_mode="livesum",
)
WORKER_INFO = Gauge(
    "pgqueue_worker_info",
    "1 per live worker process, with its version and queues.",
    ["version", "queues"],
    multiprocess_mode="livesum",
)
BUILD_INFO = Gauge("pgqueue_build_info", "pgqueue version.", ["version"], multiprocess_mode="max")
LEASES_EXPIRED_NAME = "pgqueue_leases_expired"
LEASES_EXPIRED_HELP = (
    "Running jobs whose lease expired, found by the reaper (requeued or dead-lettered)."
)
LEASES_EXPIRED = Counter(LEASES_EXPIRED_NAME, LEASES_EXPIRED_HELP, ["queue"])
JOBS_PRUNED = Counter("pgqueue_jobs_pruned", "Finished jobs deleted after retention.")
DB_DISCONNECTS = Counter(
    "pgqueue_db_disconnects",
    "Times a daemon's loop found its database connection lost (or none to be had) and"
    " backed off to reconnect, by loop: fetcher, heartbeat, completer, listener, reaper.",
    ["component"],
)
BUILD_INFO.labels(__version__).set(1)
WORKER_LOOPS = ("fetcher", "heartbeat", "completer", "listener")


def count_disconnects_from_zero(*components: str) -> None:
    """Serve pgqueue_db_disconnects_total at 0 for ``components`` before any loss: a
    series born at its first count hides that count from rate() and increase()."""
    for component in components:
        DB_DISCONNECTS.labels(component)


@functools.lru_cache(maxsize=8192)
def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, cached: the lookup is the costliest part of counting a
    job on the hot path, and label sets are bounded (queue, task, outcome)."""
    return metric.labels(*labels)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


# How long the database-wide gauges' counts may take, waiting for another process's
# count included (shared_queue_stats), and each read after them (or its wait for a
# lock), before the scrape gives up on them (pgqueue_queue_stats_up 0). The stats query
# is the one that can wait; with the connect (up to 5 s) a scrape stays near
# Prometheus' default 10 s timeout, not behind a lock for as long as it is held.
STATS_TIMEOUT_SECONDS = 5.0

# How long a scrape waits for the gauges' refresh as a whole, the connect and what runs
# before the statement timeout is set included, before it answers without them
# (pgqueue_queue_stats_up 0). A database that takes the connection and then does not
# answer at all (a PgBouncer whose server is gone) held the scrape, and every scrape
# after it behind the collector's lock, for as long as that lasted: past Prometheus'
# timeout, the whole target, the process's own metrics included, went missing. The
# refresh goes on in its thread, one at a time; the next scrape waits for it again.
STATS_WAIT_SECONDS = 8.0


T = TypeVar("T")


class _InThread(Generic[T]):
    """One call of ``run`` in a daemon thread of its own, for callers to wait on with a
    limit of their own (a database that takes a connection and then does not answer must
    not hold them): ``done`` is set when it returned (``value``) or raised (``error``)."""

    def __init__(self, run: Callable[[], T], name: str) -> None:
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None
        self.finished_at = 0.0
        self._run = run
        threading.Thread(target=self._main, name=name, daemon=True).start()

    def _main(self) -> None:
        try:
            self.value = self._run()
        except Exception as exc:  # kept for the callers: a thread must not die silently
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self.done.set()


def _stats_up(up: bool) -> GaugeMetricFamily:
    ok = GaugeMetricFamily(
        "pgqueue_queue_stats_up",
        "1 if the last query for the database-wide gauges succeeded; 0 if it"
        " failed, and those gauges are left out until it succeeds again.",
    )
    ok.add_metric([], 1.0 if up else 0.0)
    return ok


class QueueStatsCollector(Collector):
    """Database-wide gauges, from one cheap query, cached for ``ttl`` seconds, and shared
    with the other processes that serve them (store.shared_queue_stats). With
    ``reaper`` (served where a reaper runs: pgqueue-reaper, ``--reaper``), also
    ``pgqueue_reaper_info``, and each queue the query sees gets its
    ``pgqueue_leases_expired_total`` series at 0."""

    def __init__(
        self,
        dsn: str,
        ttl: float = 10.0,
        *,
        reaper: bool = True,
        wait_seconds: float = STATS_WAIT_SECONDS,
    ) -> None:
        self.dsn = dsn
        self.ttl = ttl
        self.reaper = reaper
        self.wait_seconds = wait_seconds
        self._lock = threading.Lock()
        self._at = 0.0
        self._metrics: list[Metric] = []
        # The refresh under way, in a thread of its own (at most one).
        self._refresh: _InThread[tuple[list[Metric], float]] | None = None
        # The queues the last query that succeeded saw (see SupervisorCollector).
        self.queues: frozenset[str] = frozenset()
        self._unshared_logged = False

    def describe(self) -> list[Metric]:
        # Registration must not query the database (it would cache a stale first read).
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._gauges()
        if self.reaper:
            # Whatever the query did: what tells a reaper's endpoint from a worker's.
            info = GaugeMetricFamily(
                "pgqueue_reaper_info",
                "1 where a reaper runs: pgqueue-reaper, or a worker started with --reaper"
                " (under --processes, its supervisor's endpoint).",
                labels=["version"],
            )
            info.add_metric([__version__], 1.0)
            yield info

    def _gauges(self) -> list[Metric]:
        """The cached gauges, refreshed first if older than ttl; waits for the refresh
        ``wait_seconds`` at most, the lock's wait included."""
        started = time.monotonic()
        with self._lock:
            if time.monotonic() - self._at <= self.ttl:
                return self._metrics
            refresh = self._refresh
            if (
                refresh is not None
                and refresh.done.is_set()
                and time.monotonic() - refresh.finished_at > self.ttl
            ):
                # It finished after every scrape that waited for it had given up, and more
                # than ttl ago: too old to serve now.
                refresh = self._refresh = None
            if refresh is None:
                refresh = self._refresh = _InThread(self._query, "pgqueue-stats")
        refresh.done.wait(max(0.0, self.wait_seconds - (time.monotonic() - started)))
        with self._lock:
            if refresh is self._refresh and refresh.done.is_set():
                self._refresh = None
                self._metrics = self._outcome(refresh)
            elif refresh is self._refresh:
                # Left running: the next scrape waits for it again, no second connection.
                log.warning(
                    "metrics.stats_failed",
                    error=f"no answer to the stats query within {self.wait_seconds:g} s",
                )
                return [_stats_up(False)]
            return self._metrics

    def _outcome(self, refresh: _InThread[tuple[list[Metric], float]]) -> list[Metric]:
        """What a finished refresh gives the scrapes, and until when (self._at)."""
        age = 0.0
        if refresh.value is not None:
            metrics, age = refresh.value
            metrics = [*metrics, _stats_up(True)]
        else:
            error = refresh.error
            message = str(error).strip() if isinstance(error, psycopg.Error) else repr(error)
            log.warning("metrics.stats_failed", error=message)
            # Not the last values: frozen gauges keep delta() at 0 and alerts on them
            # quiet while the queue may be on fire.
            metrics = [_stats_up(False)]
        # Kept until the counts are ttl old, counting from when they were taken (another
        # process may have stored them a while ago).
        self._at = refresh.finished_at - min(age, self.ttl)
        return metrics

    def _query(self) -> tuple[list[Metric], float]:
        depth = GaugeMetricFamily(
            "pgqueue_queue_depth",
            "Jobs per queue and state: ready (due now), scheduled (due later), running.",
            labels=["queue", "state"],
        )
        oldest = GaugeMetricFamily(
            "pgqueue_queue_oldest_ready_age_seconds",
            "Age of the oldest job that is due and not yet claimed, per queue.",
            labels=["queue"],
        )
        dead = GaugeMetricFamily(
            "pgqueue_dead_jobs", "Jobs in the dead-letter table, per queue.", labels=["queue"]
        )
        workers = GaugeMetricFamily("pgqueue_workers", "Live registered worker processes.")
        paused = GaugeMetricFamily(
            "pgqueue_queue_paused", "1 if the queue is paused.", labels=["queue"]
        )
        notify = GaugeMetricFamily(
            "pgqueue_notify_queue_usage",
            "Fraction of Postgres' NOTIFY queue in use, for the whole server"
            " (pg_notification_queue_usage()). It grows while a listening session does not"
            " read; past pgqueue.notify_max_queue_usage (0.5 unless set) pgqueue's statements"
            " stop notifying (workers poll), and full, every other notifying transaction fails.",
        )
        seen = set()
        # One transaction: the statement timeout shared_queue_stats sets first covers every
        # read of the refresh, and leaves the session as it found it.
        with store.connect(self.dsn, connect_timeout=5) as conn, conn.transaction():
            # Counted once per ttl for every process serving them.
            stats = store.shared_queue_stats(
                conn, max_age=self.ttl, timeout_seconds=STATS_TIMEOUT_SECONDS
            )
            if stats.unshared is not None and not self._unshared_logged:
                # Once: each refresh counts for itself (as before migration 0022).
                log.warning("metrics.stats_not_shared", error=stats.unshared)
                self._unshared_logged = True
            for row in stats.rows:
                q = row["queue"]
                seen.add(q)
                # Every queue's lease-expiry series exists from 0, so the first expiries
                # after a reaper starts show in increase() (a series born at 10 does not).
                if self.reaper:
                    child(LEASES_EXPIRED, q)
                depth.add_metric([q, "ready"], row["ready"])
                depth.add_metric([q, "scheduled"], row["scheduled"])
                depth.add_metric([q, "running"], row["running"])
                oldest.add_metric([q], row["oldest_ready_age_seconds"] or 0.0)
                dead.add_metric([q], row["dead"])
                paused.add_metric([q], 1.0 if row["paused"] else 0.0)
            workers.add_metric([], float(len(store.list_workers(conn))))
            notify.add_metric([], store.notify_queue_usage(conn))
        self.queues = frozenset(seen)
        return [depth, oldest, dead, workers, paused, notify], stats.age


class SupervisorCollector(Collector):
    """What a ``--processes`` supervisor serves: its children's samples, summed from
    ``path`` (prometheus-client's multiprocess mode), and with ``stats`` the database-wide
    gauges. Where the children run a reaper (``stats.reaper``), each queue those gauges
    saw also gets a ``pgqueue_leases_expired_total`` series at 0 until a child counts an
    expiry there: the series a child creates is born
    at its first expiry, which ``increase()`` does not count (a lone reaper creates its
    zeros in its own process, see QueueStatsCollector._query; the supervisor's own
    counters are not among the samples it serves)."""

    def __init__(self, path: str, stats: QueueStatsCollector | None = None) -> None:
        from prometheus_client import multiprocess

        collector = multiprocess.MultiProcessCollector
        self._children = collector(None, path=path)  # type: ignore[no-untyped-call]
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self._stats is not None:
            yield from self._stats.collect()
        if self._stats is None or not self._stats.reaper:  # no zero expiry series to add
            yield from self._children.collect()  # type: ignore[no-untyped-call]
            return
        expired: Metric | None = None
        for metric in self._children.collect():  # type: ignore[no-untyped-call]
            if metric.name == LEASES_EXPIRED_NAME:
                expired = metric
            else:
                yield metric
        if expired is None:
            expired = CounterMetricFamily(
                LEASES_EXPIRED_NAME, LEASES_EXPIRED_HELP, labels=["queue"]
            )
        counted = {s.labels.get("queue") for s in expired.samples}
        for queue in sorted(self._stats.queues - counted):
            expired.add_sample(f"{LEASES_EXPIRED_NAME}_total", {"queue": queue}, 0.0)
        yield expired


Health = Callable[[], tuple[bool, str]]


# How long /healthz waits for its database check before it answers 503. A database that
# takes the connection and then does not answer (a lock on what the check reads, a
# PgBouncer whose server is gone) held each probe, its thread and a connection for as
# long as that lasted, one more for every probe.
HEALTH_TIMEOUT_SECONDS = 3.0
# A check's answer serves the probes that come within this long of its start: each
# probe opened a database connection of its own (and logged in: SCRAM, TLS), so a
# client calling /healthz in a loop drove about 60 logins a second.
HEALTH_REUSE_SECONDS = 1.0


def database_health(dsn: str, timeout: float = HEALTH_TIMEOUT_SECONDS) -> Health:
    """A health check: does ``dsn`` take a connection and a query now, and is the pgqueue
    schema there (a daemon pointed at an unmigrated database is not ready)? Answers
    within ``timeout`` (False past it); one check runs at a time, callers that come
    while it runs wait for its answer, and that answer serves those that come within
    HEALTH_REUSE_SECONDS of its start."""

    def check_once() -> tuple[bool, str]:
        try:
            with store.connect(dsn, connect_timeout=2) as conn:
                applied = store.applied_versions(conn)
                # One statement unless this role may not read the migrations' record.
                ready = bool(applied) if applied is not None else store.schema_ready(conn)
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return False, f"database unreachable: {first}"
        if not ready:
            return False, "the pgqueue schema is missing: run `pgqueue migrate`"
        if applied is not None:
            # Upgraded code on a database not migrated yet: its statements fail.
            missing = schema_drift(applied).missing
            if missing:
                return False, (
                    f"the pgqueue schema lacks migrations {', '.join(missing)}:"
                    " run `pgqueue migrate`"
                )
        return True, "ok"

    lock = threading.Lock()
    latest: _InThread[tuple[bool, str]] | None = None
    started = 0.0

    def check() -> tuple[bool, str]:
        nonlocal latest, started
        with lock:
            now = time.monotonic()
            if latest is None or (latest.done.is_set() and now - started >= HEALTH_REUSE_SECONDS):
                latest = _InThread(check_once, "pgqueue-health")
                started = now
            running = latest
        if not running.done.wait(timeout):
            return False, (
                f"database unreachable: no answer to the health check within {timeout:g} s"
                " (a lock on pgqueue.schema_migrations, a pooler whose pool is all in use,"
                " or a server that takes connections and does not answer)"
            )
        if running.value is None:
            error = running.error
            return False, f"the database check failed: {type(error).__name__}: {error}"
        return running.value

    return check


# The metrics port answers anyone who reaches it (0.0.0.0 by default, as exporters do).
# A client that opened connections and sent nothing held a thread each, for ever: enough
# of them ran the process out of threads or file descriptors, its database connections
# and handler threads with it. Each connection now gets HTTP_IDLE_TIMEOUT_SECONDS in all
# to send its request (however slowly it sends it) and as long again for the answer;
# past MAX_HTTP_CONNECTIONS at once, or MAX_HTTP_CONNECTIONS_PER_CLIENT from one address,
# new ones are closed unanswered, so one client cannot take every slot from the probes.
HTTP_IDLE_TIMEOUT_SECONDS = 10.0
MAX_HTTP_CONNECTIONS = 32
MAX_HTTP_CONNECTIONS_PER_CLIENT = 8


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, *args: Any, max_connections: int, max_per_client: int, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._max_connections = max_connections
        self._max_per_client = max_per_client
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}  # client address: connections being served

    def _take(self, client: str) -> bool:
        with self._lock:
            if sum(self._open.values()) >= self._max_connections:
                return False
            if self._open.get(client, 0) >= self._max_per_client:
                return False
            self._open[client] = self._open.get(client, 0) + 1
            return True

    def _give_back(self, client: str) -> None:
        with self._lock:
            left = self._open[client] - 1
            if left:
                self._open[client] = left
            else:
                del self._open[client]

    def process_request(self, request: Any, client_address: Any) -> None:
        client = str(client_address[0])
        if not self._take(client):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._give_back(client)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._give_back(str(client_address[0]))

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scraper that went away (its timeout, a probe that closed its connection) or
        was too slow is routine: nothing to say. Anything else is one log event, not
        socketserver's traceback on stderr amid the JSON log lines."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        log.warning(
            "metrics.request_failed",
            client=str(client_address[0]),
            error=f"{type(exc).__name__}: {exc}",
        )


class _ReadBy(io.RawIOBase):
    """A socket's reads, each given what is left until one deadline: a client that sends
    its request a byte at a time gets no more time than one that sends nothing."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _HTTPServerV6(_HTTPServer):
    address_family = socket.AF_INET6


def _server_for(host: str) -> type[_HTTPServer]:
    """The server class for ``host``: IPv6 for an IPv6 address (``::``, ``::1``) or a
    name that resolves only to IPv6; IPv4 otherwise, as before."""
    try:
        families = {info[0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return _HTTPServer  # the bind says what is wrong with the name
    if socket.AF_INET not in families and socket.AF_INET6 in families:
        return _HTTPServerV6
    return _HTTPServer


class MetricsServer:
    """Serves /metrics and /healthz on a daemon thread; ``stop()`` shuts it down."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Health,
        *,
        idle_timeout: float = HTTP_IDLE_TIMEOUT_SECONDS,
        max_connections: int = MAX_HTTP_CONNECTIONS,
        max_per_client: int = MAX_HTTP_CONNECTIONS_PER_CLIENT,
    ) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = idle_timeout

            def setup(self) -> None:
                super().setup()
                self.rfile.close()
                deadline = time.monotonic() + idle_timeout
                self.rfile = io.BufferedReader(_ReadBy(self.connection, deadline))

            def do_GET(self) -> None:
                self.connection.settimeout(idle_timeout)  # for the answer, in all
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body = generate_latest(server.registry)
                    self._send(200, body, CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok, detail = server.health()
                    self._send(200 if ok else 503, (detail + "\n").encode(), "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes are not worth a log line each

        self.registry = registry
        self.health = health
        try:
            self._httpd = _server_for(host)(
                (host, port),
                Handler,
                max_connections=max_connections,
                max_per_client=max_per_client,
            )
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
        self.port: int = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="pgqueue-metrics", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics.listening", port=self.port)
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def process_registry() -> CollectorRegistry:
    """The registry a single daemon process serves: the default one."""
    return REGISTRY


def register_queue_stats(registry: CollectorRegistry, stats: QueueStatsCollector) -> None:
    """Register ``stats`` in ``registry``, collected before the lease-expiry counter: a
    scrape collects in registration order, and the zero series ``stats`` creates for the
    queues it sees (with ``stats.reaper``) must be in the scrape that created them, the
    first one included, not only from the next."""
    moved = True
    try:
        registry.unregister(LEASES_EXPIRED)
    except KeyError:  # not in this registry
        moved = False
    registry.register(stats)
    if moved:
        registry.register(LEASES_EXPIRED)


def supervisor_registry(path: str, stats: QueueStatsCollector | None) -> CollectorRegistry:
    """The registry a ``--processes`` supervisor serves (see SupervisorCollector)."""
    registry = CollectorRegistry()
    registry.register(SupervisorCollector(path, stats))
    return registry
