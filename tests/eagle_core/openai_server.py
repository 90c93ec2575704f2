"""A small OpenAI-compatible HTTP server that really runs a (tiny) causal LM, for tests.

It answers the two endpoints the regenerate stage's server backend calls, the way `vllm
serve` does for the parts the client relies on:

- `POST /v1/chat/completions`: renders `messages` with the tokenizer's chat template
  (generation prompt added, no special tokens added on top), generates, returns
  `choices[0].message.content`, `finish_reason` ("stop" | "length") and `usage`;
- `POST /v1/completions`: tokenizes the raw `prompt` as given, honours the vLLM/SGLang
  extension `stop_token_ids`;
- `GET /v1/models`.

Generation: one request at a time (a lock; HTTP handling is threaded), batch of one, no
padding; greedy when `temperature` is 0 (sampling with the request's `seed` otherwise).
Stop tokens: the generation config's and tokenizer's eos, plus (chat) the token the
template writes after an assistant turn, plus the request's `stop_token_ids`. The
answer text is decoded without the stop token and with special tokens skipped.

Faults for tests: `fail(body) -> int | None` returns an HTTP status to answer instead
(e.g. 500); every request is recorded in `requests` (the JSON bodies and headers).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class OpenAITestServer:
    """Serve `model_dir` on 127.0.0.1 (a free port) until `stop()`; a context manager."""

    def __init__(
        self,
        model_dir: str,
        tokenizer_dir: str | None = None,
        *,
        model_name: str = "test-model",
        api_key: str | None = None,
        fail: Callable[[dict[str, Any]], int | None] | None = None,
    ) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.model_name = model_name
        self.api_key = api_key
        self.fail = fail
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._gen_lock = threading.Lock()
        eos = self.model.generation_config.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(set(ids))
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.chat_stop_ids = sorted(set(self.eos_ids) | ({im_end} if im_end is not None else set()))
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle
    def start(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model_name}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    self._send(400, {"error": {"message": "body is not JSON"}})
                    return
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                status, doc = server.handle(self.path, body, self.headers.get("Authorization"))
                self._send(status, doc)

            def _send(self, status: int, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- the API
    def handle(self, path: str, body: dict[str, Any], auth: str | None) -> tuple[int, dict]:
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            return 401, {"error": {"message": "invalid API key"}}
        if self.fail is not None and (status := self.fail(body)) is not None:
            return status, {"error": {"message": f"injected {status}"}}
        if body.get("model") != self.model_name:
            return 404, {"error": {"message": f"model {body.get('model')!r} does not exist"}}
        route = path.rstrip("/")
        if route == "/v1/chat/completions":
            text = self.tokenizer.apply_chat_template(
                body["messages"], add_generation_prompt=True, tokenize=False
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            stops = set(self.chat_stop_ids)
        elif route == "/v1/completions":
            ids = self.tokenizer(body["prompt"])["input_ids"]
            stops = set(self.eos_ids) | set(body.get("stop_token_ids") or [])
        else:
            return 404, {"error": {"message": f"no route {path}"}}
        out, finish = self._generate(ids, stops, body)
        text = self.tokenizer.decode(
            out[:-1] if finish == "stop" else out, skip_special_tokens=True
        )
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": len(out),
            "total_tokens": len(ids) + len(out),
        }
        if route == "/v1/chat/completions":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
            return 200, {
                "object": "chat.completion",
                "model": self.model_name,
                "choices": [choice],
                "usage": usage,
            }
        choice = {"index": 0, "text": text, "finish_reason": finish}
        return 200, {
            "object": "text_completion",
            "model": self.model_name,
            "choices": [choice],
            "usage": usage,
        }

    def _generate(
        self, ids: list[int], stops: set[int], body: dict[str, Any]
    ) -> tuple[list[int], str]:
        """Token-by-token decoding with a KV cache; returns (new ids, finish reason)."""
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 0.0) or 0.0)
        gen = torch.Generator().manual_seed(int(body.get("seed") or 0))
        out: list[int] = []
        with self._gen_lock, torch.no_grad():
            past = None
            inp = torch.tensor([ids])  # [1, T]
            for _ in range(max_tokens):
                res = self.model(input_ids=inp, past_key_values=past, use_cache=True)
                past = res.past_key_values
                logits = res.logits[0, -1].float()  # [V]
                if temperature == 0.0:
                    nxt = int(logits.argmax())
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = int(torch.multinomial(probs, 1, generator=gen))
                out.append(nxt)
                if nxt in stops:
                    return out, "stop"
                inp = torch.tensor([[nxt]])  # [1, 1]
        return out, "length"
