"""The embedded system: broker, topics, Faust worker(s), API and sink as child processes.

Used by `spendledger up` and by the integration tests, so both run the same code.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from spendledger.platform.errors import StartupError
from spendledger.platform.kafka import consumer_lag, ensure_topics, port_open, start_tansu
from spendledger.platform.settings import Settings, settings_in
from spendledger.supervisor import RestartPolicy

ENV = "SPENDLEDGER_"
DEV_KEYS_FILE = "dev-keys.json"
DEV_KEY_PREFIXES = {"producer": "sl_prod_", "analyst": "sl_analyst_", "admin": "sl_admin_"}


@dataclass
class EmbeddedSystem:
    """Starts and stops the whole system on this machine."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    kafka_port: int = 19092
    worker_port: int = 0  # the first worker's; more workers (WORKER_PROCESSES) take free ports
    sink_port: int = 0  # the sink's /healthz, /readyz and /metrics (0: a free port)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    say: Callable[[str], None] = print
    startup_timeout_s: float = 90.0

    broker: subprocess.Popen[bytes] | None = field(default=None, init=False)
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    child_env: dict[str, str] = field(default_factory=dict, init=False)
    worker_ports: dict[str, int] = field(default_factory=dict, init=False)
    producer_key: str = field(default="", init=False)
    analyst_key: str = field(default="", init=False)
    admin_key: str = field(default="", init=False)
    dev_keys: bool = field(default=False, init=False)  # generated here (printable), not the operator's
    policy: RestartPolicy = field(default_factory=RestartPolicy, init=False)
    failed: str | None = field(default=None, init=False)  # why supervision gave up
    _child_env: dict[str, dict[str, str]] = field(default_factory=dict, init=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)
    abort_drain: threading.Event = field(default_factory=threading.Event, init=False)
    _lock_fd: int | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def start(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self._lock_data_dir()
        self.log_dir.mkdir(mode=0o700, exist_ok=True)
        env = dict(self.env)
        self._keys(env)
        if not env.get(f"{ENV}KAFKA_BOOTSTRAP"):
            self._step(f"starting the embedded Kafka broker (Tansu) on {self.host}:{self.kafka_port}")
            cluster_id = f"spendledger-{secrets.token_hex(8)}"
            self.broker = start_tansu(self.host, self.kafka_port, self.log_dir / "broker.log", cluster_id)
            env[f"{ENV}KAFKA_BOOTSTRAP"] = f"{self.host}:{self.kafka_port}"
            # The broker forgets everything at a stop: the API keeps what it acknowledged here until it lands.
            env.setdefault(f"{ENV}JOURNAL_DIR", str((self.data_dir / "journal").resolve()))
        env.setdefault(f"{ENV}CLICKHOUSE_DSN", f"chdb://{(self.data_dir / 'clickhouse').resolve()}")
        sink_env: dict[str, str] = {}
        api_env: dict[str, str] = {}  # the relay's token goes to the API and the sink only
        if env[f"{ENV}CLICKHOUSE_DSN"].startswith("chdb://"):
            # chDB lets one process open its data dir: the API opens it and lends it to the sink's process
            # (spendledger.platform.chdb_relay), whose work then never holds the API's GIL.
            from spendledger.platform.chdb_relay import socket_path

            relay = f"relay://:{secrets.token_urlsafe(24)}@unix{socket_path(self.data_dir)}"
            api_env[f"{ENV}CLICKHOUSE_RELAY"] = relay
            sink_env[f"{ENV}CLICKHOUSE_DSN"] = relay
        env[f"{ENV}API_HOST"] = self.host
        env[f"{ENV}API_PORT"] = str(self.port)
        if self.worker_port == 0:
            self.worker_port = _free_port(self.host)
        self.child_env = env
        settings = self.settings()
        self.worker_ports = {"worker": self.worker_port}
        for n in range(2, settings.worker_processes + 1):
            self.worker_ports[f"worker-{n}"] = _free_port(self.host)

        self._step("creating topics")
        created = ensure_topics(settings)
        self.say(f"    {len(created)} created, {len(settings.topics.all()) - len(created)} already there")

        if port_open(self.host, self.port):
            raise StartupError(f"port {self.port} on {self.host} is already in use; pick another with --port")
        if self.broker is not None:
            self._step("restoring budgets, their spend and blocks, and unlanded events (ClickHouse, journal)")
            self._restore()
        self._step(f"starting the Faust worker{'s' if len(self.worker_ports) > 1 else ''}")
        for name, port in self.worker_ports.items():
            worker_dir = str((self.data_dir / name).resolve())
            self._spawn(name, {f"{ENV}WORKER_WEB_PORT": str(port), f"{ENV}WORKER_DATA_DIR": worker_dir})
        self._step("starting the API (migrating ClickHouse)")
        self._spawn("api", api_env)
        checks = {"api": f"{self.api_url}/readyz"}
        self._wait_ready(
            checks | {n: f"http://{self.host}:{p}/healthz" for n, p in self.worker_ports.items()}
        )
        self._step("starting the sink")
        self._start_sink(sink_env)

    def _start_sink(self, env: dict[str, str], attempts: int = 3) -> None:
        """Start the sink on its port (a free one, picked now, unless one was given). A free port can be
        taken before the sink binds it (by any process's outgoing connection): then another is tried."""
        chosen = self.sink_port
        for attempt in range(1, attempts + 1):
            self.sink_port = chosen or _free_port(self.host)
            log = self.log_dir / "sink.log"
            start = log.stat().st_size if log.exists() else 0
            self._spawn("sink", {**env, f"{ENV}SINK_PORT": str(self.sink_port)})
            try:
                self._wait_ready({"sink": f"http://{self.host}:{self.sink_port}/readyz"})
                return
            except StartupError:
                with log.open("rb") as out:
                    out.seek(start)
                    taken = b"Address already in use" in out.read()
                if chosen or not taken or attempt == attempts:
                    raise
                self._log_event(f"the sink's port {self.sink_port} was taken meanwhile; trying another")

    def _lock_data_dir(self) -> None:
        """One system per data dir: a second `up` would replay and prune the first one's journal."""
        import fcntl

        fd = os.open(self.data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(f"{self.data_dir} is in use by another `spendledger up`") from None
        self._lock_fd = fd  # held until `stop()` (or this process's end)

    def settings(self) -> Settings:
        """The settings the children run with."""
        return settings_in(self.child_env)

    def _restore(self) -> None:
        """`spendledger restore` in a process of its own (chDB allows one process per data dir)."""
        log_path = self.log_dir / "restore.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
                [sys.executable, "-m", "spendledger", "restore"],
                env=self.child_env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,  # a Ctrl-C of `up` does not cut a restore short
            )
            assert process.stdout is not None  # noqa: S101 - asked for above
            for line in process.stdout:  # its progress, as it goes
                self.say(line.rstrip())
            if process.wait() != 0:
                raise StartupError(f"restoring the ledger's state failed; see {log_path}")

    def _keys(self, env: dict[str, str]) -> None:
        """Use the configured keys, or generate dev keys once and keep them in the data dir."""
        configured = {scope: env.get(f"{ENV}{scope.upper()}_KEYS", "") for scope in DEV_KEY_PREFIXES}
        if not all(configured.values()):
            path = self.data_dir / DEV_KEYS_FILE
            kept = json.loads(path.read_text()) if path.exists() else {}
            missing = {s: p + secrets.token_urlsafe(24) for s, p in DEV_KEY_PREFIXES.items() if s not in kept}
            if missing:  # a first start, or a data dir from before the analyst scope
                kept.update(missing)
                fresh = path.with_suffix(".tmp")
                fresh.unlink(missing_ok=True)
                fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(json.dumps(kept))
                os.replace(fresh, path)
            self.dev_keys = not any(configured.values())
            self.say(f"    dev keys (kept in {path}):")
            for scope, value in configured.items():
                if value:
                    self.say(f"      {scope + ' key:':13} (configured: {ENV}{scope.upper()}_KEYS)")
                    continue  # the operator's own key is never printed
                configured[scope] = kept[scope]
                env[f"{ENV}{scope.upper()}_KEYS"] = configured[scope]
                self.say(f"      {scope + ' key:':13} {configured[scope]}")
        self.producer_key = configured["producer"].split(",")[0]
        self.analyst_key = configured["analyst"].split(",")[0]
        self.admin_key = configured["admin"].split(",")[0]

    def _spawn(self, name: str, env: dict[str, str] | None = None) -> None:
        self._child_env[name] = env or {}
        self.policy.started(name, time.monotonic())
        command = "worker" if name.startswith("worker") else name
        with (self.log_dir / f"{name}.log").open("ab") as log:  # the child keeps its own descriptor
            self.children[name] = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
                [sys.executable, "-m", "spendledger", command],
                env={**self.child_env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_ready(self, checks: dict[str, str]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending = dict(checks)
        while pending:
            for name, url in list(pending.items()):
                child = self.children[name]
                if child.poll() is not None:
                    raise StartupError(
                        f"the {name} exited with code {child.returncode}; see {self.log_dir / (name + '.log')}"
                    )
                try:
                    if httpx.get(url, timeout=1.0).status_code == 200:
                        self.say(f"    {name} ready")
                        del pending[name]
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise StartupError(f"not ready within {self.startup_timeout_s:.0f} s: {', '.join(pending)}")
            time.sleep(0.2)

    def exited_child(self) -> str | None:
        """The name of a child that has exited, if any (for callers that do not supervise)."""
        for name, child in self.children.items():
            if child.poll() is not None:
                return name
        if self.broker is not None and self.broker.poll() is not None:
            return "broker"
        return None

    # ------------------------------------------------------------ supervision

    def supervise(self) -> None:
        """Restart every child that exited, with backoff (RestartPolicy); each exit and restart is logged.

        The embedded broker is not restarted: its log is in memory, so a new one
        would start empty while the sink's landed offsets (kept in ClickHouse)
        point past its end, and events would be skipped. A broker exit sets
        `failed` instead, and `up` stops with an error (production runs a
        replicated Kafka cluster).
        """
        with self._lock:
            if self._stopping.is_set() or self.failed is not None:
                return
            now = time.monotonic()
            if self.broker is not None and self.broker.poll() is not None:
                self.failed = (
                    f"the embedded broker exited with code {self.broker.returncode}; its log was in memory, "
                    f"so the system cannot go on without losing events (see {self.log_dir / 'broker.log'})"
                )
                self._log_event(self.failed)
                return
            for name, process in self.children.items():
                if process.poll() is None:
                    continue
                record = self.policy.children.get(name)
                if record is None or record.restart_at is None:
                    delay = self.policy.exited(name, now)
                    self._log_event(
                        f"the {name} exited with code {process.returncode}; restarting it in {delay:.0f} s "
                        f"(restart {self.policy.total_restarts(name)})"
                    )
                elif self.policy.due(name, now):
                    self._restart(name)

    def _restart(self, name: str) -> None:
        self._spawn(name, self._child_env.get(name))
        self._log_event(f"restarted the {name} (pid {self.children[name].pid})")

    def _log_event(self, text: str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {text}"
        with (self.log_dir / "supervisor.log").open("a") as log:
            log.write(line + "\n")
        self.say(f"supervisor: {text}")

    def start_supervisor(self, interval_s: float = 0.5) -> threading.Thread:
        """Supervise in a background thread until `stop()`."""

        def run() -> None:
            while not self._stopping.wait(interval_s):
                try:
                    self.supervise()
                except Exception as exc:  # keep supervising; say what went wrong
                    self._log_event(f"supervision failed: {type(exc).__name__}: {exc}")

        thread = threading.Thread(target=run, name="supervisor", daemon=True)
        thread.start()
        return thread

    def stop(self, drain_timeout_s: float | None = None) -> int:
        """Drain (see `drain`), then stop the sink, the API, the worker(s) and the broker: each SIGTERM,
        then SIGKILL. Returns the messages left unprocessed when the drain gave up (0: all landed)."""
        self._stopping.set()
        left = self.drain(drain_timeout_s) if drain_timeout_s else 0
        with self._lock:
            self._stop_children()
        self.release_data_dir()
        return left

    def release_data_dir(self) -> None:
        """Let the next system use the data dir (what the end of this process does too)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def drain(self, timeout_s: float) -> int:
        """Refuse new events (the API answers 503 with Retry-After), then wait until every topic the
        services read is processed up to its end, showing progress. Returns the messages left."""
        api = self.children.get("api")
        if api is None or api.poll() is not None or not self.child_env:
            if api is not None:
                self.say(
                    "    the API is not running, so nothing can drain; what is left is sent again at the next start"
                )
            return 0
        api.send_signal(signal.SIGUSR1)
        settings = self.settings()
        groups = settings.topics.consumed()
        deadline = time.monotonic() + timeout_s
        started = time.monotonic()
        clear, left, shown = 0, 0, -1
        while time.monotonic() < deadline and not self.abort_drain.is_set():
            try:
                lag = consumer_lag(settings, groups, timeout_s=2)
            except Exception as exc:  # the broker went away: nothing more can drain
                self.say(f"    cannot read the pipeline's progress: {exc}")
                break
            left = sum(lag.values())
            clear = clear + 1 if left == 0 else 0
            if clear >= 2:  # twice in a row: the budget agent's signals, too, have landed
                self.say(f"    drained in {time.monotonic() - started:.1f} s")
                return 0
            if left != shown and left:
                busy = ", ".join(f"{t} {n:,}" for t, n in sorted(lag.items()) if n)
                self.say(f"    draining {left:,} messages… ({busy})")
                shown = left
            time.sleep(0.5)
        kept = (
            "the events they come from are kept in the journal and sent again at the next start"
            if self.broker is not None
            else "they stay in Kafka and are processed at the next start"
        )
        waited = time.monotonic() - started
        text = f"gave up draining after {waited:.0f} s with {left:,} messages unprocessed; {kept}"
        self.say(f"    {text}")
        self._log_event(text)
        return left

    def _stop_children(self) -> None:
        # The sink first, while the API still lends it the engine to land its last batch.
        for name in ["sink", "api", *self.worker_ports]:
            child = self.children.get(name)
            if child is not None:
                _terminate(child, 20)
        if self.broker is not None:
            _terminate(self.broker, 5)

    def _step(self, text: str) -> None:
        self.say(f"==> {text}")


def _terminate(process: subprocess.Popen[bytes], grace_s: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
