"""A local stand-in for the OpenAI and Anthropic HTTP APIs, to try the SDK and the LiteLLM plugin without a
provider key: `python -m spendledger.fakellm [--port 8100]` (the only stand-in in the SDK tests).

The real `openai` and `anthropic` client libraries talk to it over HTTP. It
answers chat completions, responses, embeddings and messages, streamed (SSE)
or not, with fixed usage, and keeps every request it received. A model whose
name starts with `fail` gets a 500.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PROMPT = "SECRET-PROMPT: the quarterly numbers are"
COMPLETION = "SECRET-COMPLETION: up forty percent on last quarter"
WORDS = (COMPLETION + " ") * 10

CHAT_USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 200,
    "total_tokens": 1200,
    "prompt_tokens_details": {"cached_tokens": 0},
}
RESPONSES_USAGE = {
    "input_tokens": 1000,
    "output_tokens": 200,
    "total_tokens": 1200,
    "input_tokens_details": {"cached_tokens": 400},
    "output_tokens_details": {"reasoning_tokens": 0},
}
EMBEDDING_USAGE = {"prompt_tokens": 8, "total_tokens": 8}
ANTHROPIC_START_USAGE = {
    "input_tokens": 1000,
    "output_tokens": 1,
    "cache_read_input_tokens": 500,
    "cache_creation_input_tokens": 100,
}
ANTHROPIC_USAGE = {**ANTHROPIC_START_USAGE, "output_tokens": 200}


class FakeLLM:
    """`with FakeLLM() as llm:` serves on `llm.url` (`/v1/...`) until the block ends."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=10_000)  # the latest
        self._counter = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, port), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeLLM:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def next_id(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}_{self._counter:04d}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                fake.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                model = str(body.get("model", ""))
                if model.startswith("fail"):
                    self._json(500, {"error": {"message": "upstream exploded", "type": "server_error"}})
                    return
                route = {
                    "/v1/chat/completions": fake.chat,
                    "/v1/responses": fake.responses,
                    "/v1/embeddings": fake.embeddings,
                    "/v1/messages": fake.messages,
                }.get(self.path)
                if route is None:
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                answer = route(body)
                if isinstance(answer, dict):
                    self._json(200, answer)
                else:
                    self._sse(answer)

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _sse(self, events: Iterator[tuple[str | None, Any]]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for name, data in events:
                        text = data if isinstance(data, str) else json.dumps(data)
                        head = f"event: {name}\n" if name else ""
                        self.wfile.write(f"{head}data: {text}\n\n".encode())
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading: a cancelled stream
                self.close_connection = True

        return Handler

    # ------------------------------------------------------------ OpenAI

    def chat(self, body: dict[str, Any]) -> Any:
        cid, model, created = self.next_id("chatcmpl"), body["model"], int(time.time())
        if not body.get("stream"):
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": COMPLETION},
                        "finish_reason": "stop",
                    }
                ],
                "usage": CHAT_USAGE,
            }
        include_usage = (body.get("stream_options") or {}).get("include_usage")

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }

        def events() -> Iterator[tuple[str | None, Any]]:
            yield None, chunk({"role": "assistant", "content": ""})
            for word in WORDS.split():
                yield None, chunk({"content": word + " "})
            yield None, chunk({}, "stop")
            if include_usage:
                yield None, {**chunk({}), "choices": [], "usage": CHAT_USAGE}
            yield None, "[DONE]"

        return events()

    def responses(self, body: dict[str, Any]) -> Any:
        response = {
            "id": self.next_id("resp"),
            "object": "response",
            "created_at": int(time.time()),
            "model": body["model"],
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "id": "msg_1",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": COMPLETION, "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": RESPONSES_USAGE,
        }
        if not body.get("stream"):
            return response

        def events() -> Iterator[tuple[str | None, Any]]:
            started = {**response, "status": "in_progress", "output": [], "usage": None}
            yield "response.created", {"type": "response.created", "response": started, "sequence_number": 0}
            for n, word in enumerate(WORDS.split(), start=1):
                yield (
                    "response.output_text.delta",
                    {
                        "type": "response.output_text.delta",
                        "delta": word + " ",
                        "item_id": "msg_1",
                        "output_index": 0,
                        "content_index": 0,
                        "sequence_number": n,
                    },
                )
            yield (
                "response.completed",
                {"type": "response.completed", "response": response, "sequence_number": 999},
            )

        return events()

    def embeddings(self, body: dict[str, Any]) -> Any:
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "model": body["model"],
            "usage": EMBEDDING_USAGE,
        }

    # ------------------------------------------------------------ Anthropic

    def messages(self, body: dict[str, Any]) -> Any:
        mid, model = self.next_id("msg"), body["model"]
        message = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": COMPLETION}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": ANTHROPIC_USAGE,
        }
        if not body.get("stream"):
            return message

        def events() -> Iterator[tuple[str | None, Any]]:
            start = {**message, "content": [], "stop_reason": None, "usage": ANTHROPIC_START_USAGE}
            yield "message_start", {"type": "message_start", "message": start}
            yield (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
            for word in WORDS.split():
                delta = {"type": "text_delta", "text": word + " "}
                yield "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            yield "content_block_stop", {"type": "content_block_stop", "index": 0}
            yield (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 200},
                },
            )
            yield "message_stop", {"type": "message_stop"}

        return events()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="A fake OpenAI / Anthropic API with fixed usage, on loopback."
    )
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    fake = FakeLLM(port=args.port)
    print(
        f"fake LLM on {fake.url} (OpenAI: /chat/completions, /responses, /embeddings; Anthropic: /messages)"
    )
    print("every call uses 1,000 input and 200 output tokens; a model named fail… answers 500; Ctrl-C stops")
    try:
        fake.server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
