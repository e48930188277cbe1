"""The embedded engine lent to the sink's process: chDB lets one process open its data dir.

The API owns the chDB engine in the embedded system (its SQL, reports, keys and budgets read it). The sink
runs in a process of its own, so its Python work (decoding, checking and encoding every record) never
holds the API's GIL while a gateway waits on `/v1/check` (docs/performance.md). It reaches the engine
through this relay: a Unix socket in the data directory (0700, so only the system's own user reaches it,
whichever end it is), each request also carrying a token only the supervisor's children know. The DSN
names both: `relay://:TOKEN@unix/PATH/TO/relay.sock`.

Frames, both ways: a 4-byte big-endian length and a JSON header, then a 4-byte length and a body. The
server checks a request's token before it reads its body. Requests: `query` (the body answers in
JSONCompact), `insert` (the body is the data, in `fmt`) and `command`. The client binds parameters
itself, as clickhouse-connect does, and holds one connection. Every statement the sink sends is safe to
send twice (its inserts carry deduplication tokens), so a kept connection found dead is retried once on a
new one; a failure to reach the engine is `RelayUnavailable` (a ConnectionError: retried, never taken
for a bad row).
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import socketserver
import stat
import struct
import threading
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

import orjson
from clickhouse_connect.driver.binding import finalize_query

log = logging.getLogger(__name__)

SCHEME = "relay"
_LENGTH = struct.Struct(">I")
MAX_HEADER_BYTES = 1024 * 1024  # a statement and its bound ids (the sink's look-ups stay under 256 KiB)
MAX_BODY_BYTES = 256 * 1024 * 1024
MAX_CONNECTIONS = 8
IDLE_TIMEOUT_S = 600.0
# A Unix socket's path has room for 107 bytes; a longer data dir gets a private directory of its own.
MAX_SOCKET_PATH = 100


class RelayError(Exception):
    """The engine refused a request."""


class RelayUnavailable(RelayError, ConnectionError):
    """The relay could not carry a request (the API stopped, a connection broke): retry it."""


@dataclass(frozen=True)
class RelayAddress:
    path: str
    token: str = field(repr=False)

    @classmethod
    def parse(cls, dsn: str) -> RelayAddress:
        parts = urlsplit(dsn)
        if parts.scheme != SCHEME or parts.hostname != "unix" or not parts.path or not parts.password:
            raise ValueError("a relay DSN is relay://:TOKEN@unix/PATH/TO/SOCKET")
        return cls(parts.path, parts.password)

    def dsn(self) -> str:
        return f"{SCHEME}://:{self.token}@unix{self.path}"


# ------------------------------------------------------------------ framing


def _send(sock: socket.socket, header: dict[str, Any], body: bytes = b"") -> None:
    head = orjson.dumps(header)
    sock.sendall(b"".join((_LENGTH.pack(len(head)), head, _LENGTH.pack(len(body)), body)))


def _receive_header(sock: socket.socket, limit: int) -> dict[str, Any] | None:
    """A frame's header, or None when the peer closed between frames."""
    first = _read(sock, _LENGTH.size, allow_eof=True)
    if first is None:
        return None
    header = orjson.loads(_read(sock, _length(first, limit)) or b"")
    if not isinstance(header, dict):
        raise RelayError("a relay header must be a JSON object")
    return header


def _receive_body(sock: socket.socket) -> bytes:
    return _read(sock, _length(_read(sock, _LENGTH.size) or b"", MAX_BODY_BYTES)) or b""


def _length(raw: bytes, limit: int) -> int:
    (n,) = _LENGTH.unpack(raw)
    if n > limit:
        raise RelayError(f"a relay frame of {n} bytes is over {limit}")
    return int(n)


def _read(sock: socket.socket, n: int, *, allow_eof: bool = False) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            if allow_eof and left == n:
                return None
            raise ConnectionError("the relay connection closed mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------ server (in the engine's process)


class RelayServer:
    """Serves `client` (a clickhouse-connect client on the engine) to token holders on a Unix socket."""

    def __init__(self, client: Any, address: RelayAddress) -> None:
        self.client = client
        self.address = address
        self._lock = threading.Lock()  # one statement at a time on the one client
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        relay = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                if not relay._slots.acquire(blocking=False):
                    log.warning("relay connection refused: %d are open", MAX_CONNECTIONS)
                    return
                try:
                    self.request.settimeout(IDLE_TIMEOUT_S)
                    relay._serve(self.request)
                finally:
                    relay._slots.release()

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

        _remove_socket(address.path)  # one a killed API left behind
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            self._server = Server(address.path, Handler)
        finally:
            os.umask(old_umask)
        self._thread = threading.Thread(target=self._server.serve_forever, name="chdb-relay", daemon=True)

    def start(self) -> RelayServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        _remove_socket(self.address.path)

    def _serve(self, sock: socket.socket) -> None:
        token = self.address.token.encode()
        try:
            while (header := _receive_header(sock, MAX_HEADER_BYTES)) is not None:
                if not hmac.compare_digest(str(header.get("token", "")).encode(), token):
                    log.warning("relay request without the token refused")
                    return
                body = _receive_body(sock)
                try:
                    with self._lock:
                        answer, data = self._run(header, body)
                except Exception as exc:  # the engine's errors come in many types; the client raises them
                    answer, data = {"error": f"{type(exc).__name__}: {exc}"[:2000]}, b""
                _send(sock, answer, data)
        except (OSError, RelayError, orjson.JSONDecodeError) as exc:
            log.debug("relay connection ended", extra={"error": str(exc)})

    def _run(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        op, settings = header.get("op"), header.get("settings") or None
        if op == "query":
            return {}, bytes(self.client.raw_query(header["sql"], settings=settings, fmt="JSONCompact"))
        if op == "insert":
            self.client.raw_insert(
                header["table"], header["columns"], body, settings=settings, fmt=header["fmt"]
            )
            return {}, b""
        if op == "command":
            result = self.client.command(header["sql"], settings=settings)
            return {"result": result if isinstance(result, int | str) else str(result)}, b""
        raise RelayError(f"unknown relay request {op!r}")


def _remove_socket(path: str) -> None:
    """Remove a socket at `path` (never a file of another kind)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------ client (in the sink's process)


@dataclass(frozen=True)
class RelayResult:
    column_names: tuple[str, ...]
    result_rows: list[list[Any]]


class RelayClient:
    """The part of clickhouse-connect's client the sink uses, over the relay. Rows come back as JSON
    values (64-bit integers as numbers; dates and decimals as the engine writes them in JSON)."""

    def __init__(self, dsn: str, timeout_s: float = 120.0) -> None:
        self.address = RelayAddress.parse(dsn)
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def query(
        self, query: str, parameters: Any = None, settings: dict[str, Any] | None = None
    ) -> RelayResult:
        sql = finalize_query(query, parameters, UTC)
        settings = {"output_format_json_quote_64bit_integers": 0, **(settings or {})}
        _, body = self._request({"op": "query", "sql": sql, "settings": settings})
        data = orjson.loads(body)
        return RelayResult(tuple(c["name"] for c in data["meta"]), data["data"])

    def command(self, cmd: str, parameters: Any = None, settings: dict[str, Any] | None = None) -> Any:
        header, _ = self._request(
            {"op": "command", "sql": finalize_query(cmd, parameters, UTC), "settings": settings}
        )
        return header.get("result")

    def raw_insert(
        self,
        table: str,
        column_names: list[str] | None = None,
        insert_block: bytes | str = b"",
        settings: dict[str, Any] | None = None,
        fmt: str | None = None,
    ) -> None:
        body = insert_block.encode() if isinstance(insert_block, str) else bytes(insert_block)
        header = {"op": "insert", "table": table, "columns": column_names, "settings": settings, "fmt": fmt}
        self._request(header, body)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _request(self, header: dict[str, Any], body: bytes = b"") -> tuple[dict[str, Any], bytes]:
        with self._lock:
            reused = self._sock is not None
            try:
                answer, data = self._exchange(header, body)
            except RelayUnavailable:
                if not reused:
                    raise
                answer, data = self._exchange(header, body)  # the kept connection had died: once, anew
        if "error" in answer:
            raise RelayError(str(answer["error"]))
        return answer, data

    def _exchange(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        try:
            sock = self._connected()
            _send(sock, {**header, "token": self.address.token}, body)
            answer = _receive_header(sock, MAX_BODY_BYTES)
            data = _receive_body(sock) if answer is not None else b""
        except (OSError, RelayError, orjson.JSONDecodeError) as exc:
            self._drop()
            raise RelayUnavailable(f"the ClickHouse relay at {self.address.path}: {exc}") from exc
        if answer is None:
            self._drop()
            raise RelayUnavailable(
                "the ClickHouse relay closed the connection (wrong token, or the API stopped)"
            )
        return answer, data

    def _connected(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(self.address.path)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


def socket_path(data_dir: os.PathLike[str] | str) -> str:
    """Where the relay's socket goes: in the data dir (0700), or in a private directory when that path is
    longer than a Unix socket's allows."""
    path = os.path.join(os.path.abspath(data_dir), "relay.sock")
    if len(path.encode()) <= MAX_SOCKET_PATH:
        return path
    import tempfile

    return os.path.join(tempfile.mkdtemp(prefix="spendledger-relay-"), "relay.sock")  # 0700
