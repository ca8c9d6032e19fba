"""deploy/: every file parses, validates against its format's schema or tool where one
is available offline, and agrees with pgqueue itself: the flags and environment
variables of every command exist (checked against the click commands), and every metric
that a dashboard, an alert or an autoscaler reads is one pgqueue exports.

Validators: systemd-analyze verify/security (systemd units), kubernetes-validate
(Kubernetes schemas, offline) and kubectl kustomize (where kubectl is installed),
check-jsonschema's vendored compose-spec schema (Compose), BuildKit's Dockerfile parser
(the `dockerfile` package) plus the rules below (no Dockerfile linter is packaged for
Debian or PyPI; hadolint runs if it is on PATH), promtool check/test (Prometheus rules
and config; Debian's `prometheus` package). Tests whose tool is missing are skipped with
the tool's name.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import psycopg
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from pgqueue import cli, enqueue
from pgqueue import metrics as pgmetrics
from pgqueue.config import (
    ABORT_GRACE_SECONDS,
    CANCEL_GRACE_SECONDS,
    CLAIM_WAIT_SECONDS,
    DEFAULT_EXECUTOR_GRACE_SECONDS,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEREGISTER_TIMEOUT_SECONDS,
    FLUSH_TIMEOUT_SECONDS,
    POOL_CLOSE_TIMEOUT_SECONDS,
    STOP_MARGIN_SECONDS,
)
from pgqueue.supervisor import REAPER_STOP_MARGIN_SECONDS
from tests.conftest import BIN, ROOT, Daemons, free_ports, scalar, wait_until

DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "pgqueue-dashboard.json"
JOB_NAMES = {"pgqueue-worker", "pgqueue-reaper"}

# --- what pgqueue really offers ------------------------------------------------------


def stop_margin(params: dict[str, Any]) -> float:
    """What a worker started with these parameters may take beyond its shutdown timeout."""
    return STOP_MARGIN_SECONDS + (REAPER_STOP_MARGIN_SECONDS if params["with_reaper"] else 0.0)


def test_the_stop_margin_covers_a_workers_slowest_stop() -> None:
    """The documented margin (and the supervisor's wait) covers every bounded wait of a
    worker's stop after --shutdown-timeout, with room to close and exit."""
    # A step that waits on the database is cut short at its time, then takes up to two
    # ABORT_GRACE_SECONDS to end (worker/abort.py).
    cut_short = 2 * ABORT_GRACE_SECONDS
    waits = (
        CLAIM_WAIT_SECONDS + cut_short  # a claim in flight
        + CANCEL_GRACE_SECONDS  # handlers it cancelled
        + FLUSH_TIMEOUT_SECONDS + cut_short  # writing outcomes
        + cut_short  # the heartbeat, listener and completer loops
        + DEREGISTER_TIMEOUT_SECONDS + cut_short
        + POOL_CLOSE_TIMEOUT_SECONDS + cut_short  # the pool's background connects
        + DEFAULT_EXECUTOR_GRACE_SECONDS
    )  # fmt: skip
    assert waits + 2.0 <= STOP_MARGIN_SECONDS
    # What the deploy files tell operators to allow.
    margin = f"--shutdown-timeout` + {STOP_MARGIN_SECONDS:.0f} s"
    assert margin in " ".join((DEPLOY / "README.md").read_text().split())
    margin = f"SHUTDOWN_TIMEOUT + {STOP_MARGIN_SECONDS:.0f} s"
    assert margin in (SYSTEMD / "pgqueue-worker@.service").read_text()
    margin = f"--shutdown-timeout + {STOP_MARGIN_SECONDS:.0f} s"
    for path in (
        K8S / "base" / "worker-deployment.yaml",
        K8S / "components" / "monitoring" / "prometheusrule.yaml",
        COMPOSE / "docker-compose.yml",
        PROMETHEUS / "alerts.yml",
    ):
        assert margin in " ".join(path.read_text().split()), path
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"the shutdown timeout plus {STOP_MARGIN_SECONDS:.0f} s" in readme


COMMANDS: dict[str, click.Command] = {
    "pgqueue": cli.main,
    "pgqueue-worker": cli.worker_command,
    "pgqueue-reaper": cli.reaper_command,
}


def parse_command(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``argv`` (program first) with pgqueue's own click command, as the program
    would: an unknown flag, a bad value or a missing required option raises
    ``click.UsageError``. Returns the command's name and its parsed parameters."""
    program = Path(argv[0]).name
    assert program in COMMANDS, f"{argv[0]} is not a pgqueue program"
    command, args, name = COMMANDS[program], list(argv[1:]), program
    while isinstance(command, click.Group):
        assert args, f"{program} needs a subcommand"
        sub = command.commands.get(args[0])
        assert sub is not None, f"{program} has no subcommand {args[0]!r}"
        command, name, args = sub, f"{name} {args[0]}", args[1:]
    with command.make_context(name, args) as ctx:
        return name, dict(ctx.params)


def click_envvars() -> set[str]:
    """Every environment variable a pgqueue command reads."""
    found: set[str] = set()

    def walk(command: click.Command) -> None:
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                found.add(envvar)
            elif envvar:
                found.update(envvar)
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                walk(sub)

    for command in COMMANDS.values():
        walk(command)
    return found


def exported_metrics() -> dict[str, set[str]]:
    """Sample names pgqueue's daemons expose (as Prometheus scrapes them: counters with
    _total, histograms with _bucket/_sum/_count) -> their labels. The metrics defined
    in pgqueue.metrics plus the database gauges of QueueStatsCollector (their names are
    checked against a live reaper in test_exported_metrics_match_a_live_scrape)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
    }
    names: dict[str, set[str]] = {}
    for value in vars(pgmetrics).values():
        if isinstance(value, MetricWrapperBase):
            labels = set(value._labelnames)
            for suffix in suffixes[value._type]:
                names[value._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    names.update(
        {
            "pgqueue_queue_depth": {"queue", "state"},
            "pgqueue_queue_oldest_ready_age_seconds": {"queue"},
            "pgqueue_dead_jobs": {"queue"},
            "pgqueue_workers": set(),
            "pgqueue_queue_paused": {"queue"},
            "pgqueue_queue_stats_up": set(),
            "pgqueue_notify_queue_usage": set(),
            "pgqueue_reaper_info": {"version"},
        }
    )
    return names


EXPORTED = exported_metrics()
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
BUILTIN_SERIES = {"up": set()}

# --- a small PromQL reader ------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w$.])[a-zA-Z_:][\w:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_KEYWORDS |= {"group_left", "group_right", "atan2", "inf", "nan"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression refers to."""
    text = _STRING.sub('""', expr)
    labels: set[str] = set()
    for body in _MATCHERS.findall(text):
        labels.update(m.group(1) for m in re.finditer(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    for _, body in _GROUPING.findall(text):
        labels.update(x.strip() for x in body.split(",") if x.strip())
    text = _GROUPING.sub(" ", text)
    metrics = set()
    for m in _IDENT.finditer(text):
        if text[m.end() :].lstrip().startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue
        metrics.add(m.group(0))
    return metrics, labels


def check_promql(expr: str, where: str) -> set[str]:
    """Assert ``expr`` reads only exported pgqueue metrics (or ``up``) and only their
    labels; returns the metric names."""
    metrics, labels = promql_names(expr)
    known = {**EXPORTED, **BUILTIN_SERIES}
    unknown = metrics - set(known)
    assert not unknown, f"{where}: {sorted(unknown)} not exported by pgqueue: {expr}"
    allowed = set(TARGET_LABELS).union(*(known[m] for m in metrics))
    assert labels <= allowed, f"{where}: labels {sorted(labels - allowed)} unknown: {expr}"
    return metrics


def test_promql_reader() -> None:
    assert promql_names(
        "histogram_quantile(0.95, sum by (le, task)"
        ' (rate(pgqueue_job_duration_seconds_bucket{queue=~"$queue"}[$__rate_interval])))'
    ) == ({"pgqueue_job_duration_seconds_bucket"}, {"le", "task", "queue"})
    assert promql_names(
        'max(pgqueue_workers) == 0 or absent(up{job="pgqueue-worker"} == 1)'
        " unless on (queue) x offset 5m"
    ) == ({"pgqueue_workers", "up", "x"}, {"job", "queue"})
    with pytest.raises(AssertionError, match="pgqueue_jobs_completed"):
        check_promql("rate(pgqueue_jobs_completed[5m])", "test")  # the _total is missing
    with pytest.raises(AssertionError, match="labels"):
        check_promql('pgqueue_workers{queue="a"}', "test")


def test_exported_metrics_match_a_live_scrape(dsn: str, daemons: Daemons) -> None:
    """The names above are what a worker and a reaper really serve on /metrics."""
    worker_port, reaper_port = free_ports(2)
    worker = daemons.worker("--metrics-port", str(worker_port), "--poll-interval", "0.2")
    reaper = daemons.reaper("--metrics-port", str(reaper_port), "--interval", "0.2")
    with psycopg.connect(dsn, autocommit=True) as conn:
        enqueue(conn, "record", {"note": "scrape"})
        wait_until(lambda: scalar(conn, "SELECT count(*) FROM public.executions"), timeout=30)
    served: dict[str, set[str]] = {}

    def scrape(port: int, wanted: str) -> str | None:
        # The handler's own write commits before the worker records the outcome (and
        # counts it), so wait for the counter's sample rather than scrape once. (Its
        # name alone is in the HELP and TYPE lines from the start.)
        got = http_get(port, "/metrics")
        sample = re.compile(rf"^{re.escape(wanted)}[{{ ]", re.MULTILINE)
        return got[1] if got is not None and sample.search(got[1]) else None

    for proc, port, wanted in (
        (worker, worker_port, "pgqueue_jobs_completed_total"),
        (reaper, reaper_port, "pgqueue_workers"),
    ):
        text = wait_until(lambda port=port, wanted=wanted: scrape(port, wanted), timeout=30)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("pgqueue_"):
                    served.setdefault(sample.name, set()).update(sample.labels)
        assert proc.poll() is None
    assert set(served) <= set(EXPORTED), sorted(set(served) - set(EXPORTED))
    for name, labels in served.items():
        assert labels <= EXPORTED[name], name
    # Everything the dashboard's panels need once a job ran (leases_expired and pruned
    # appear only when something expired or was pruned).
    for name in (
        "pgqueue_jobs_completed_total",
        "pgqueue_job_duration_seconds_bucket",
        "pgqueue_jobs_running",
        "pgqueue_queue_depth",
        "pgqueue_queue_oldest_ready_age_seconds",
        "pgqueue_dead_jobs",
        "pgqueue_workers",
    ):
        assert name in served, name


# --- helpers -----------------------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return None


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


@contextlib.contextmanager
def running(argv: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# --- systemd -----------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file: section -> key -> values (repeated keys kept in order; backslash
    continuations joined)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}: cannot parse {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_env_file(path: Path) -> dict[str, str]:
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r}"
        env[key.strip()] = value.strip().strip('"')
    return env


def unit_environment(
    unit: dict[str, dict[str, list[str]]], instance: str, instance_file: bool = True
) -> dict[str, str]:
    """What systemd hands the service: Environment= (with %i), then each
    EnvironmentFile= in order, the files replaced by the examples shipped here (the
    optional per-instance file only with ``instance_file``)."""
    env: dict[str, str] = {}
    service = unit["Service"]
    for value in service.get("Environment", []):
        key, _, val = value.replace("%i", instance).partition("=")
        env[key] = val
    for value in service.get("EnvironmentFile", []):
        optional = value.startswith("-")
        name = Path(value.lstrip("-").replace("%i", instance)).name
        candidates = [SYSTEMD / f"{name}.example"]
        if name.startswith("worker-") and instance_file:
            candidates.append(SYSTEMD / "worker-example.env.example")
        example = next((c for c in candidates if c.exists()), None)
        if example is None:
            assert optional, f"required {value} has no example in deploy/systemd"
            continue
        env.update(parse_env_file(example))
    return env


def exec_argv(unit: dict[str, dict[str, list[str]]], env: dict[str, str]) -> list[str]:
    """ExecStart= split as systemd does: ${VAR} is one argument."""
    (line,) = unit["Service"]["ExecStart"]
    argv = []
    for word in line.split():
        if word.startswith("$"):
            name = word.strip("${}")
            assert name in env, f"ExecStart uses ${{{name}}}, which nothing sets"
            argv.append(env[name])
        else:
            argv.append(word)
    return argv


UNITS = {
    "pgqueue-worker@.service": "pgqueue-worker",
    "pgqueue-reaper.service": "pgqueue-reaper",
    "pgqueue-migrate.service": "pgqueue migrate",
}
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "CapabilityBoundingSet": "",
}


def units_with_real_binaries(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at this venv's programs, plus an instance of
    the worker template."""
    out = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/opt/pgqueue/venv/bin/", f"{BIN}/")
        out.append(tmp_path / name)
        out[-1].write_text(text)
        if name.endswith("@.service"):
            out.append(tmp_path / name.replace("@.", "@emails."))
            out[-1].write_text(text)
    return out


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    units = units_with_real_binaries(tmp_path)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    # Warnings (unknown keys, unparsable values) do not change the exit code. (Lines
    # about other units, e.g. the host's postgresql.service, are not ours to judge.)
    ours = [line for line in output.splitlines() if "pgqueue" in line]
    assert ours == [], output
    # And it does catch mistakes here.
    bad = tmp_path / "bad.service"
    bad.write_text(units[0].read_text().replace("KillMode=mixed", "KillMode=mixd"))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert "kill mode" in (result.stdout + result.stderr).lower()


def test_systemd_units_hardening_score(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    for unit in units_with_real_binaries(tmp_path):
        if unit.name.endswith("@.service"):
            continue
        result = subprocess.run(
            [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if "--offline" in result.stderr:
            pytest.skip("systemd-analyze security --offline needs systemd 250 or newer")
        match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
        assert match, result.stdout + result.stderr
        assert float(match.group(1)) <= 2.0, f"{unit.name}: exposure {match.group(1)}"


def test_systemd_units_content() -> None:
    for name, program in UNITS.items():
        unit = parse_unit(SYSTEMD / name)
        service = unit["Service"]

        def one(key: str, service: dict[str, list[str]] = service, name: str = name) -> str:
            assert key in service, f"{name}: {key}= missing"
            return service[key][-1]

        for key, value in HARDENING.items():
            assert one(key) == value, f"{name}: {key}"
        assert one("DynamicUser") == "yes" or one("User") not in ("", "root")
        assert "/etc/pgqueue/pgqueue.env" in service["EnvironmentFile"]
        env = unit_environment(unit, "emails")
        parsed_name, params = parse_command(exec_argv(unit, env))
        assert parsed_name == program
        if program == "pgqueue migrate":
            assert one("Type") == "oneshot"
            continue
        assert one("KillSignal") == "SIGTERM"
        assert one("KillMode") == "mixed"
        assert one("Restart") == "on-failure"
        assert "network-online.target" in " ".join(unit["Unit"]["After"])
        assert unit["Install"]["WantedBy"] == ["multi-user.target"]
        stop_timeout = float(one("TimeoutStopSec").rstrip("s"))
        if program == "pgqueue-worker":
            # The stop timeout covers the shutdown timeout (defaults and example file).
            assert params["shutdown_timeout"] + stop_margin(params) <= stop_timeout
            assert stop_timeout >= DEFAULT_SHUTDOWN_TIMEOUT + STOP_MARGIN_SECONDS
            # The instance name is the default queue list.
            assert unit_environment(unit, "reports")["PGQUEUE_QUEUES"] == "reports,exports"
            assert "PGQUEUE_QUEUES=%i" in service["Environment"]


def test_systemd_environment_files_name_real_settings() -> None:
    """Every variable in the example environment files is read by pgqueue (click
    envvars) or used by a unit's ExecStart; none is silently ignored."""
    used = set(click_envvars()) | {"PYTHONUNBUFFERED"}
    for name in UNITS:
        (line,) = parse_unit(SYSTEMD / name)["Service"]["ExecStart"]
        used.update(re.findall(r"\$\{(\w+)\}", line))
    for example in SYSTEMD.glob("*.example"):
        unknown = set(parse_env_file(example)) - used
        assert not unknown, f"{example.name}: {sorted(unknown)} are read by nothing"
    assert "PGQUEUE_METRICS_PORT" not in parse_env_file(SYSTEMD / "pgqueue.env.example")


def _mdwe_preexec() -> None:
    """What MemoryDenyWriteExecute=yes enforces: no memory that is both writable and
    executable (prctl PR_SET_MDWE, Linux 6.3+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_MDWE")


def _mdwe_supported() -> bool:
    try:
        result = subprocess.run(
            [sys.executable, "-c", "pass"], preexec_fn=_mdwe_preexec, capture_output=True
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def test_systemd_exec_lines_run(dsn: str, tmp_path: Path) -> None:
    """Run each unit's ExecStart as systemd would (its environment, its working
    directory, no PYTHONPATH), and stop the worker the way KillMode=mixed does: SIGTERM
    to the main process only, here a --processes 2 supervisor, which must bring its
    children down and exit 0. Units with MemoryDenyWriteExecute=yes run under
    PR_SET_MDWE where the kernel has it."""
    mdwe = _mdwe_supported()

    def prepare(name: str, **overrides: str) -> tuple[list[str], dict[str, str], Any]:
        unit = parse_unit(SYSTEMD / name)
        env = unit_environment(unit, "default", instance_file=False)
        env.update(PGQUEUE_DSN=dsn, PGQUEUE_APP="tests.apps.sample:registry", **overrides)
        argv = exec_argv(unit, env)
        argv[0] = str(BIN / Path(argv[0]).name)
        full_env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", **env}
        use_mdwe = mdwe and unit["Service"].get("MemoryDenyWriteExecute") == ["yes"]
        return argv, full_env, _mdwe_preexec if use_mdwe else None

    argv, env, preexec = prepare("pgqueue-migrate.service")
    result = subprocess.run(
        argv, env=env, cwd=ROOT, preexec_fn=preexec, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout

    reaper_port, worker_port = free_ports(2)
    argv, env, preexec = prepare("pgqueue-reaper.service", PGQUEUE_METRICS_PORT=str(reaper_port))
    with running(argv, env=env, cwd=ROOT, preexec_fn=preexec) as reaper:
        wait_until(lambda: (http_get(reaper_port, "/healthz") or (0,))[0] == 200, timeout=30)
        reaper.send_signal(signal.SIGTERM)
        assert reaper.wait(timeout=30) == 0

    argv, env, _ = prepare(
        "pgqueue-worker@.service",
        PGQUEUE_PROCESSES="2",
        PGQUEUE_POLL_INTERVAL="0.2",
        PGQUEUE_METRICS_PORT=str(worker_port),
    )
    log = (tmp_path / "worker.log").open("wb")
    # cwd plays the unit's WorkingDirectory: the app (tests.apps.sample) is imported
    # from it.
    with running(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT) as w:
        with psycopg.connect(dsn, autocommit=True) as conn:
            job_id = enqueue(conn, "sleep", {"seconds": 1.5})
            wait_until(
                lambda: (
                    scalar(conn, "SELECT count(*) FROM public.executions") or w.poll() is not None
                ),
                timeout=30,
            )
            assert w.poll() is None, (tmp_path / "worker.log").read_text()
            os.kill(w.pid, signal.SIGTERM)  # the main process only (KillMode=mixed)
            assert w.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()
            # The running job finished within the shutdown timeout.
            state = scalar(conn, "SELECT state FROM pgqueue.jobs WHERE id = %s", (job_id,))
            assert state == "succeeded"
        # No child survived its supervisor.
        if shutil.which("pgrep"):
            children = subprocess.run(
                ["pgrep", "-s", str(w.pid)], capture_output=True, text=True
            ).stdout.split()
            assert children == [], children


# --- Kubernetes ---------------------------------------------------------------------------

K8S_VERSIONS = ("1.28.0", "1.37.0")
NOT_MANIFESTS = {"kustomization.yaml", "prometheus-adapter-values.yaml"}

# The Prometheus Operator's CRDs have no schema in kubernetes-validate: a structural
# schema of the fields these manifests use (unknown fields are refused).
_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
    "additionalProperties": False,
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "additionalProperties": False,
                "properties": {
                    "jobLabel": {"type": "string"},
                    "selector": _SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                                "scrapeTimeout": {"type": "string"},
                                "honorLabels": {"type": "boolean"},
                                "relabelings": {"type": "array"},
                                "metricRelabelings": {"type": "array"},
                            },
                        },
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "interval": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": ["string", "integer"]},
                                            "for": {"type": "string"},
                                            "keep_firing_for": {"type": "string"},
                                            "labels": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            },
                                            "annotations": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def validate_k8s(doc: dict[str, Any], where: str) -> None:
    import jsonschema
    import kubernetes_validate

    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key in CRD_SCHEMAS:
        jsonschema.validate(doc, CRD_SCHEMAS[key])
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{where}: {key[1]} invalid for {version}: {exc}") from exc


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name not in NOT_MANIFESTS)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The rendered resources of a kustomization: with kubectl's built-in kustomize
    where kubectl is installed, else resources and components loaded without their
    transformations (enough to validate and cross-check the base)."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for entry in [*spec.get("resources", []), *spec.get("components", [])]:
        path = (directory / entry).resolve()
        docs += kustomize(path) if path.is_dir() else load_yaml_docs(path)
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} found"
    return matches[0]


def test_kubernetes_manifests_validate() -> None:
    pytest.importorskip("kubernetes_validate")
    files = manifest_files()
    assert len(files) >= 9
    kinds = set()
    for path in files:
        for doc in load_yaml_docs(path):
            validate_k8s(doc, str(path.relative_to(ROOT)))
            kinds.add(doc["kind"])
    assert kinds >= {
        "Deployment",
        "Job",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PodMonitor",
        "PrometheusRule",
        "ServiceAccount",
        "Namespace",
    }
    # The validator refuses what it should.
    worker = load_yaml_docs(K8S / "base" / "worker-deployment.yaml")[0]
    broken = copy.deepcopy(worker)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(AssertionError, match="httpGett"):
        validate_k8s(broken, "broken")
    broken = copy.deepcopy(load_yaml_docs(K8S / "components/monitoring/podmonitor.yaml")[0])
    broken["spec"]["podMetricsEndpoint"] = broken["spec"].pop("podMetricsEndpoints")
    with pytest.raises(Exception, match="podMetricsEndpoint"):
        validate_k8s(broken, "broken")


@pytest.mark.parametrize("overlay", ["base", "overlays/example"])
def test_kustomize_renders_valid_consistent_manifests(overlay: str) -> None:
    pytest.importorskip("kubernetes_validate")
    docs = kustomize(K8S / overlay)
    for doc in docs:
        validate_k8s(doc, f"{overlay}: {doc['kind']} {doc['metadata']['name']}")
    worker = find(docs, "Deployment", "pgqueue-worker")
    reaper = find(docs, "Deployment", "pgqueue-reaper")
    job = find(docs, "Job", "pgqueue-migrate")
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}

    for workload, program in ((worker, "pgqueue-worker"), (reaper, "pgqueue-reaper")):
        pod = workload["spec"]["template"]
        spec = pod["spec"]
        (container,) = spec["containers"]
        name, params = parse_command(container["command"])
        assert name == program
        # Graceful termination: the grace period covers the shutdown timeout.
        if program == "pgqueue-worker":
            assert spec["terminationGracePeriodSeconds"] >= (
                params["shutdown_timeout"] + stop_margin(params)
            )
        # Probes on /healthz of the --metrics-port, through the named port.
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == params["metrics_port"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        # Non-root, read-only root filesystem, no privileges, resources set.
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert {"/tmp"} <= {m["mountPath"] for m in container["volumeMounts"]}
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        # The DSN comes from a Secret.
        env = {e["name"]: e for e in container["env"]}
        assert env["PGQUEUE_DSN"]["valueFrom"]["secretKeyRef"]["key"] == "dsn"
        # Pods carry the labels the PodMonitor and the alerts rely on.
        assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == program
        assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pgqueue"
        assert (
            workload["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        )

    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert parse_command(migrate["command"])[0] == "pgqueue migrate"

    # Every Secret reference resolves where the overlay provides the Secret.
    if secrets:
        for workload in (worker, reaper, job):
            for container in workload["spec"]["template"]["spec"]["containers"]:
                for e in container["env"]:
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] in secrets, ref
                        assert ref["key"] in secrets[ref["name"]]["data"], ref
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
            "pgqueue"
        }

    pdb = find(docs, "PodDisruptionBudget", "pgqueue-worker")
    worker_labels = worker["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()

    if overlay == "base":
        assert worker["spec"]["replicas"] == 2
        return
    hpa = find(docs, "HorizontalPodAutoscaler", "pgqueue-worker")
    assert hpa["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    if shutil.which("kubectl"):
        # Replicas left to the HPA: kubectl apply would set the manifest's number again
        # on every apply (an upgrade scaled an autoscaled fleet back to 2 pods).
        assert "replicas" not in worker["spec"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] in EXPORTED
    selector_labels = set(metric["external"]["metric"]["selector"]["matchLabels"])
    assert selector_labels <= EXPORTED[metric["external"]["metric"]["name"]]

    monitor = find(docs, "PodMonitor", "pgqueue")
    for workload in (worker, reaper):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert labels[monitor["spec"]["jobLabel"]] in JOB_NAMES
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"metrics"}

    rule = find(docs, "PrometheusRule", "pgqueue")
    alerts = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    assert rule["spec"] == alerts, "PrometheusRule differs from deploy/prometheus/alerts.yml"


def test_prometheus_adapter_rules_use_exported_metrics() -> None:
    values = yaml.safe_load(
        (K8S / "components" / "autoscaling" / "prometheus-adapter-values.yaml").read_text()
    )
    for rule in values["rules"]["external"]:
        name = rule["name"]["as"]
        assert name in EXPORTED
        series, _ = promql_names(rule["seriesQuery"])
        assert series == {name}
        query = rule["metricsQuery"].replace("<<.Series>>", name).replace("<<.LabelMatchers>>", "")
        check_promql(query.replace("namespace,", ""), "prometheus-adapter metricsQuery")


# --- Compose and the Dockerfile ---------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return data


def test_compose_file_matches_the_compose_spec_schema(tmp_path: Path) -> None:
    checker = BIN / "check-jsonschema"
    if not checker.exists():
        pytest.skip("check-jsonschema is not installed (pip install -e '.[dev]')")
    args = [str(checker), "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run(
        [*args, str(COMPOSE / "docker-compose.yml")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        (COMPOSE / "docker-compose.yml")
        .read_text()
        .replace("stop_grace_period:", "stop_grace_perod:")
    )
    result = subprocess.run([*args, str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "stop_grace_perod" in result.stdout


def _seconds(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def test_compose_services_are_consistent() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) >= {"postgres", "migrate", "worker", "reaper", "prometheus", "grafana"}
    for name in ("migrate", "worker", "reaper", "demo-producer"):
        service = services[name]
        # Non-root image, read-only root filesystem, no capabilities.
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
        build = service["build"]
        assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == (
            COMPOSE / "Dockerfile"
        )
    assert parse_command(services["migrate"]["command"])[0] == "pgqueue migrate"
    ports = {}
    for name, program in (("worker", "pgqueue-worker"), ("reaper", "pgqueue-reaper")):
        service = services[name]
        parsed, params = parse_command(service["command"])
        assert parsed == program
        ports[name] = params["metrics_port"]
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert str(params["metrics_port"]) in " ".join(service["healthcheck"]["test"])
        if program == "pgqueue-worker":
            grace = _seconds(service["stop_grace_period"])
            assert grace >= params["shutdown_timeout"] + stop_margin(params)
            # The app named by --app exists in the mounted folder.
            module = params["app"].split(":")[0]
            assert (ROOT / "examples" / f"{module}.py").exists()
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Every bind-mounted file or folder exists.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {source}"
    # Prometheus scrapes the worker replicas and the reaper on their metrics ports.
    prom = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert set(jobs) >= JOB_NAMES
    worker_sd = jobs["pgqueue-worker"]["dns_sd_configs"][0]
    assert worker_sd["names"] == ["worker"] and worker_sd["port"] == ports["worker"]
    assert jobs["pgqueue-reaper"]["static_configs"][0]["targets"] == [f"reaper:{ports['reaper']}"]
    # Grafana gets the dashboard and a datasource whose uid the provisioning sets.
    grafana_volumes = " ".join(services["grafana"]["volumes"])
    assert "../grafana/pgqueue-dashboard.json" in grafana_volumes
    datasources = yaml.safe_load(
        (COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


def test_compose_demo_producer_runs(dsn: str, tmp_path: Path) -> None:
    """The `demo` profile's producer enqueues demo jobs until SIGTERM, then exits 0."""
    env = {
        **os.environ,
        "PGQUEUE_DSN": dsn,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), str(ROOT)]),
    }
    with (
        running([sys.executable, str(COMPOSE / "demo_producer.py")], env=env) as proc,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        wait_until(
            lambda: (
                scalar(conn, "SELECT count(*) FROM pgqueue.jobs WHERE queue = 'demo'")
                or proc.poll() is not None
            ),
            timeout=30,
        )
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        tasks = {r[0] for r in conn.execute("SELECT DISTINCT task FROM pgqueue.jobs")}
        assert tasks >= {"demo.greet", "demo.fetch"}


def dockerignore_excludes(path: str) -> bool:
    """Whether deploy/compose/Dockerfile.dockerignore leaves ``path`` (relative to the
    build context, the repository root) out of the context. Last matching rule wins."""
    excluded = False
    for raw in (COMPOSE / "Dockerfile.dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(regex + "(/.*)?", path):
            excluded = not negate
    return excluded


def test_dockerfile_parses_and_follows_the_rules() -> None:
    dockerfile = pytest.importorskip("dockerfile", reason="the dockerfile parser is not installed")
    path = COMPOSE / "Dockerfile"
    text = path.read_text()
    commands = dockerfile.parse_file(str(path))
    assert text.startswith("# syntax=docker/dockerfile:1")
    stages = [c for c in commands if c.cmd == "FROM"]
    assert len(stages) >= 2, "multi-stage: build the wheel in one stage, run in another"
    assert all(len(c.value) == 3 and c.value[1].upper() == "AS" for c in stages)
    build_args = dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG")
    for stage in stages:
        image = stage.value[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: build_args[m.group(1)], image)
        assert ":" in image and not image.endswith(":latest"), f"pin the base image: {image}"
        assert "slim" in image or "alpine" in image or "distroless" in image, image
    final = commands[commands.index(stages[-1]) :]
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime stage runs as root"
    assert not any(c.cmd == "ADD" for c in commands), "COPY, not ADD"
    for c in commands:
        if c.cmd == "RUN":
            run = " ".join(c.value)
            assert "sudo" not in run
            if "pip install" in run or "pip wheel" in run:
                assert "--no-cache-dir" in run or "PIP_NO_CACHE_DIR" in text
            if "apt-get install" in run:
                assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists" in run
        if c.cmd in ("CMD", "ENTRYPOINT"):
            assert c.json, f"{c.cmd} in exec form (signals reach pgqueue directly)"
    # The runtime stage installs from the build stage only, with no index.
    install = next(c for c in final if c.cmd == "RUN" and "pip install" in c.value[0])
    assert "--no-index" in install.value[0] and any("from=build" in f for f in install.flags)
    # Every COPY source from the context exists and survives the .dockerignore.
    for c in commands:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for source in c.value[:-1]:
                assert (ROOT / source).exists(), source
                assert not dockerignore_excludes(source.rstrip("/")), source
                if (ROOT / source).is_dir():
                    for inner in (ROOT / source).rglob("*.sql"):
                        assert not dockerignore_excludes(str(inner.relative_to(ROOT)))
    assert dockerignore_excludes(".venv") and dockerignore_excludes("tests/test_deploy.py")
    assert dockerignore_excludes("pgqueue/__pycache__/cli.cpython-311.pyc")


def test_dockerfile_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (not packaged for Debian or PyPI)")
    result = subprocess.run(
        [hadolint, str(COMPOSE / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ------------------------------------------------------------------------------


def dashboard_targets() -> list[tuple[str, str]]:
    data = json.loads(DASHBOARD.read_text())
    out = []
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_dashboard_reads_only_exported_metrics() -> None:
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"] and data["title"]
    variables = {v["name"] for v in data["templating"]["list"]}
    assert variables == {"datasource", "queue"}
    used: set[str] = set()
    for panel in data["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel.get("targets"), panel["title"]
    for title, expr in dashboard_targets():
        used |= check_promql(expr, f"dashboard panel {title!r}")
        for var in re.findall(r"\$(\w+)", expr):
            assert var in variables or var.startswith("__"), f"{title}: ${var}"
    for variable in data["templating"]["list"]:
        if variable["type"] == "query":
            check_promql(variable["definition"].removeprefix("label_values(").split(",")[0], "var")
    # What the dashboard is for.
    assert used >= {
        "pgqueue_jobs_completed_total",
        "pgqueue_job_duration_seconds_bucket",
        "pgqueue_queue_depth",
        "pgqueue_queue_oldest_ready_age_seconds",
        "pgqueue_jobs_running",
        "pgqueue_leases_expired_total",
        "pgqueue_dead_jobs",
        "pgqueue_workers",
        "pgqueue_db_disconnects_total",
        "up",
    }
    exprs = " ".join(e for _, e in dashboard_targets())
    assert "sum by (outcome) (rate(pgqueue_jobs_completed_total" in exprs
    assert "histogram_quantile(0.99" in exprs
    # Panels do not overlap.
    cells: set[tuple[int, int]] = set()
    for panel in data["panels"]:
        g = panel["gridPos"]
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        area = {(x, y) for x in xs for y in ys}
        assert not (area & cells), panel["title"]
        assert g["x"] + g["w"] <= 24
        cells |= area
    assert len({p["id"] for p in data["panels"]}) == len(data["panels"])


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, is valid PromQL (promtool
    parses it as a recording rule)."""
    promtool = tool("promtool")
    rules = []
    for i, (_, expr) in enumerate(dashboard_targets()):
        filled = expr.replace("$__rate_interval", "1m").replace("$queue", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": filled})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Prometheus ---------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_alerts_read_only_exported_metrics() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert names >= {
        "PgqueueDaemonDown",
        "PgqueueNoLiveWorkers",
        "PgqueueQueueLagGrowing",
        "PgqueueDeadLetterGrowth",
        "PgqueueLeaseExpirySpike",
        "PgqueueDatabaseConnectionsLost",
    }
    used: set[str] = set()
    for rule in rules:
        used |= check_promql(rule["expr"], rule["alert"])
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        for job in re.findall(r'job=~?"([^"]+)"', rule["expr"]):
            assert set(job.split("|")) <= JOB_NAMES, f"{rule['alert']}: job {job}"
    assert used >= {
        "up",
        "pgqueue_workers",
        "pgqueue_queue_oldest_ready_age_seconds",
        "pgqueue_dead_jobs",
        "pgqueue_leases_expired_total",
        "pgqueue_db_disconnects_total",
    }


def test_promtool_check_rules_and_config(tmp_path: Path) -> None:
    promtool = tool("promtool")
    for args in (
        ["check", "rules", str(PROMETHEUS / "alerts.yml")],
        ["check", "config", "--syntax-only", str(PROMETHEUS / "prometheus.yml")],
    ):
        result = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS
        )
        assert result.returncode == 0, result.stdout + result.stderr
    # The full config check also loads the rule files it names.
    shutil.copy(PROMETHEUS / "prometheus.yml", tmp_path)
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path)
    result = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_unit_tests_for_alerts() -> None:
    promtool = tool("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROMETHEUS,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts.test.yml").read_text()))
    assert len(tested) >= 2 and tested <= {r["alert"] for r in alert_rules()}


def test_a_units_working_directory_exists_or_may_be_missing() -> None:
    """systemd refuses to start a unit whose WorkingDirectory is missing (status
    200/CHDIR) unless the path starts with '-'. The recipe in deploy/README.md installs
    the app into the venv and creates no app folder, so such a folder must be optional,
    or created by the recipe."""
    recipe = (ROOT / "deploy" / "README.md").read_text()
    for path in sorted(SYSTEMD.glob("*.service")):
        for value in parse_unit(path)["Service"].get("WorkingDirectory", []):
            if value.startswith("-"):
                continue
            assert f"install -d {value}" in recipe or f"mkdir -p {value}" in recipe, (
                f"{path.name}: WorkingDirectory={value} must start with '-' or be created"
                " by the recipe in deploy/README.md"
            )
