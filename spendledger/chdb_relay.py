"""The embedded engine lent to the sink's process: chDB lets one process open its data dir.

The API owns the chDB engine in the embedded system (its SQL, reports, keys and budgets read it). The sink
runs in a process of its own, so its Python work (decoding, checking and encoding every record) never
holds the API's GIL while a gateway waits on `/v1/check` (docs/performance.md). It reaches the engine
through this relay: a loopback TCP connection to the API, each request carrying a token only the
supervisor's children know. The DSN names both: `relay://:TOKEN@127.0.0.1:PORT`.

Frames, both ways: a 4-byte big-endian length and a JSON header, then a 4-byte length and a body.
Requests: `query` (the body answers in JSONCompact), `insert` (the body is the data, in `fmt`) and
`command`. The client binds parameters itself, as clickhouse-connect does, and holds one connection.
"""

from __future__ import annotations

import hmac
import logging
import socket
import socketserver
import struct
import threading
from dataclasses import dataclass
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

import orjson
from clickhouse_connect.driver.binding import finalize_query

log = logging.getLogger(__name__)

SCHEME = "relay"
_LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 256 * 1024 * 1024


class RelayError(Exception):
    """The engine refused a request, or the relay could not carry it."""


@dataclass(frozen=True)
class RelayAddress:
    host: str
    port: int
    token: str

    @classmethod
    def parse(cls, dsn: str) -> RelayAddress:
        parts = urlsplit(dsn)
        if parts.scheme != SCHEME or not parts.hostname or not parts.port or not parts.password:
            raise ValueError("a relay DSN is relay://:TOKEN@HOST:PORT")
        return cls(parts.hostname, parts.port, parts.password)

    def dsn(self) -> str:
        return f"{SCHEME}://:{self.token}@{self.host}:{self.port}"


# ------------------------------------------------------------------ framing


def _send(sock: socket.socket, header: dict[str, Any], body: bytes = b"") -> None:
    head = orjson.dumps(header)
    sock.sendall(b"".join((_LENGTH.pack(len(head)), head, _LENGTH.pack(len(body)), body)))


def _receive(sock: socket.socket) -> tuple[dict[str, Any], bytes] | None:
    """One frame, or None when the peer closed between frames."""
    first = _read(sock, _LENGTH.size, allow_eof=True)
    if first is None:
        return None
    header = orjson.loads(_read(sock, _length(first)) or b"")
    body = _read(sock, _length(_read(sock, _LENGTH.size) or b"")) or b""
    if not isinstance(header, dict):
        raise RelayError("a relay header must be a JSON object")
    return header, body


def _length(raw: bytes) -> int:
    (n,) = _LENGTH.unpack(raw)
    if n > MAX_FRAME_BYTES:
        raise RelayError(f"a relay frame of {n} bytes is over {MAX_FRAME_BYTES}")
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
    """Serves `client` (a clickhouse-connect client on the engine) to token holders on loopback."""

    def __init__(self, client: Any, address: RelayAddress) -> None:
        self.client = client
        self.address = address
        self._lock = threading.Lock()  # one statement at a time on the one client
        relay = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                relay._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((address.host, address.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="chdb-relay", daemon=True)

    def start(self) -> RelayServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, sock: socket.socket) -> None:
        try:
            while (frame := _receive(sock)) is not None:
                header, body = frame
                if not hmac.compare_digest(
                    str(header.get("token", "")).encode(), self.address.token.encode()
                ):
                    log.warning("relay request without the token refused")
                    return
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
            try:
                sock = self._connected()
                _send(sock, {**header, "token": self.address.token}, body)
                frame = _receive(sock)
            except (OSError, RelayError, orjson.JSONDecodeError) as exc:
                self._drop()
                raise RelayError(
                    f"the ClickHouse relay at {self.address.host}:{self.address.port}: {exc}"
                ) from exc
            if frame is None:
                self._drop()
                raise RelayError(
                    "the ClickHouse relay closed the connection (wrong token, or the API stopped)"
                )
        answer, data = frame
        if "error" in answer:
            raise RelayError(str(answer["error"]))
        return answer, data

    def _connected(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.create_connection(
                (self.address.host, self.address.port), timeout=self.timeout_s
            )
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
