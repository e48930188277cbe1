"""A process that emits and exits without flushing still delivers: the client flushes at interpreter exit."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]


def test_events_emitted_just_before_exit_are_delivered() -> None:
    received: list[dict[str, Any]] = []

    class Ingest(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.extend(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["events"])
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ingest)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    script = (
        "from spendledger.sdk import SpendClient, track_context\n"
        f"spend = SpendClient({url!r}, 'sl_prod_x', flush_interval_s=30)\n"
        "with track_context(user_id='leaving'):\n"
        "    for n in range(3):\n"
        "        spend.record(model='gpt-4o', usage={'input_tokens': n})\n"
    )
    try:
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert [e["usage"]["input_tokens"] for e in received] == [0, 1, 2]
    assert {e["metadata"]["user_id"] for e in received} == {"leaving"}
