"""The regenerate stage: the target writes the answers it is going to be drafted for.

A draft learns to predict what the target will say, so it trains best on what the target
says (EAGLE-3 trains on target-generated responses). This stage keeps the prompts of the
`download` records and replaces the answers with the target's own:

- chat: every assistant turn in order, each conditioned on the regenerated earlier turns
  (`last_turn_only=True`: only the last one, earlier turns kept as downloaded); a
  conversation that ends with a user turn gets one more, generated, assistant turn;
  system and user turns are kept;
- FIM: the middle, completed from a FIM prompt in the tokenizer's own FIM tokens (PSM or
  SPM) until the end-of-middle token;
- pre-tokenized records (`kind="tokens"`) pass through unchanged (there is no prompt).

The output has exactly the columns (and Arrow schema) of the `download` records, so
`tokenize` reads it unchanged. `original_json` holds the original answer and the
provenance of the new one: `{"messages": [...]}` or `{"middle": "..."}`, plus
`"generated_by"` (target, backend, settings), `"finish"` and `"generated_tokens"`.

Two backends behind one interface (`GenerationBackend.generate(requests) -> results`):

- `local`: transformers `generate` on CPU or GPU, requests sorted by prompt length and
  batched with left padding, KV cache on; greedy when temperature is 0.
- `server`: any OpenAI-compatible endpoint (`vllm serve`, `sglang.launch_server`):
  `/v1/chat/completions` for chat (the server applies its chat template),
  `/v1/completions` with the raw FIM prompt; bounded concurrency (threads), timeouts,
  retries with exponential backoff. The API key comes from the environment variable
  whose NAME is configured; the value is never stored, logged or hashed.

Within a shard, generation goes in rounds: round 0 asks for every FIM middle and every
chat's first turn to write, round r for the chats' r-th turns (each built on the answers
of the rounds before), so the local backend batches across records and the server backend
keeps `concurrency` requests in flight.

A record whose generation fails is dropped (never kept half-regenerated or with its old
answer) and counted by reason: `empty` (nothing but whitespace), `length` (cut at
max_new_tokens without an end token; kept as cut with `keep_length=True`), `server_error`
(still failing after the retries), `bad_request` (the server refused this prompt with a
4xx), `prompt_too_long` (longer than the target's context), `bad_record` (unusable
messages, unknown kind). The first sample ids per reason go to the manifest meta
(`reject_examples`). Server errors past
`max_server_errors` of a shard's requests stop the stage instead (an outage must not turn
into lost shards); 401/403/404 stop it at once (wrong key, URL or model name).

Resume: output shard i holds input rows [i*shard_size, (i+1)*shard_size); each finished
shard is journaled together with its stats (`stats/shard-XXXXX.json`), so a killed run
redoes only unfinished shards. Sampling seeds derive from (seed, sample id, turn): per
batch for the local backend, per request for the server, so a resumed run writes the same
shards as an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from eagle_core.errors import ConfigError, DataError, ModelMismatchError
from eagle_core.fim import FimTokens, discover_fim_tokens
from eagle_core.models import load_target, load_tokenizer
from eagle_core.records import RECORD_SCHEMA
from storage import ArtifactStore, StageRef
from storage.shards import iter_batches, write_parquet

log = logging.getLogger(__name__)

CODE_VERSION = "1"
STAGE = "regenerate"

FinishReason = Literal["stop", "length", "error"]
REJECT_REASONS = (
    "empty",
    "length",
    "server_error",
    "bad_request",
    "prompt_too_long",
    "bad_record",
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_REJECT_EXAMPLES = 5  # sample ids kept per reject reason (manifest meta), to look into
_RETRY_BACKOFF_MAX_S = 30.0  # a server restarting takes seconds; longer waits only stall


@dataclass(frozen=True, kw_only=True)
class RegenerateConfig:
    """How the target rewrites the answers. Fields that change the output go into the key."""

    backend: Literal["local", "server"] = "local"  # local: transformers here; server: OpenAI API
    # the target: local dir, Hub name, or artifact URL <root>/build_demo_target/<key>. The
    # server backend uses it for provenance and (FIM only) for its tokenizer's FIM tokens
    target: str
    tokenizer: str | None = None  # None: the target's own tokenizer
    server_url: str | None = None  # e.g. http://host:8000 (with or without /v1); server only
    model: str | None = None  # model name sent to the server; None: `target`
    # NAME of the environment variable holding the API key (never the key itself); None: no
    # Authorization header (vllm serve without --api-key)
    api_key_env: str | None = None
    max_new_tokens: int = 1024  # answers cut here are rejected ("length") unless keep_length
    # True: keep answers cut at max_new_tokens as they are (finish "length" is still counted).
    # On-policy data for a target that rarely ends its answers (a serving engine cuts those
    # at its token limit too); False: only finished answers are training data.
    keep_length: bool = False
    temperature: float | None = 0.0  # 0: greedy; None: the target's generation_config
    top_p: float | None = None  # None: the target's generation_config (or the server default)
    seed: int = 0  # sampling seed; per shard (local) or per request (server)
    last_turn_only: bool = False  # True: regenerate only the last assistant turn of a chat
    fim_order: Literal["psm", "spm"] = "psm"  # PSM is the order most FIM models train on
    concurrency: int = 16  # server: requests in flight (a vLLM server batches them itself)
    timeout_s: float = 600.0  # server: per request; long answers at low batch priority are slow
    retries: int = 4  # server: retries after a failed request (5xx, 429, timeout, connection)
    retry_backoff_s: float = 1.0  # server: first wait between tries, doubled each retry
    # fraction of a shard's requests that may fail with server errors (counted rejects); past
    # it the stage stops without keeping the shard, so an outage never loses data for good
    max_server_errors: float = 0.1
    shard_size: int = 256  # records per output shard = unit of resume
    batch_size: int = 8  # local: prompts per generate call (length-sorted, left padded)
    # local: weights dtype; float32 on CPU, bfloat16 on GPU (what servers run) -- in the key
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = None  # local: torch device; None: cuda if available, else cpu

    def __post_init__(self) -> None:
        if self.backend not in ("local", "server"):
            raise ConfigError(
                f"regenerate.backend={self.backend!r} is not 'local' or 'server'",
                fix="use 'local' (transformers here) or 'server' (an OpenAI-compatible URL)",
            )
        if not self.target:
            raise ConfigError(
                "regenerate.target is empty",
                fix="pass the target model: a local dir, a Hub name or a demo target URL",
            )
        if self.backend == "server":
            url = self.server_url or ""
            if not url.startswith(("http://", "https://")):
                raise ConfigError(
                    f"regenerate.server_url={self.server_url!r} is not an http(s) URL",
                    fix="pass the server's base URL, e.g. http://localhost:8000/v1",
                )
            if "@" in url.split("://", 1)[1].split("/", 1)[0]:
                raise ConfigError(
                    "regenerate.server_url contains credentials (user:password@host)",
                    fix="remove them from the URL and put the API key in an environment "
                    "variable named by api_key_env",
                )
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            raise ConfigError(
                "regenerate.api_key_env is not an environment variable name (it must be "
                "the variable's NAME, not the key)",
                fix="export the key, e.g. `export OPENAI_API_KEY=...`, and pass "
                "api_key_env='OPENAI_API_KEY'",
            )
        if self.max_new_tokens < 1:
            raise ConfigError(
                f"regenerate.max_new_tokens={self.max_new_tokens} is < 1", fix="use e.g. 1024"
            )
        if self.temperature is not None and not self.temperature >= 0.0:
            raise ConfigError(
                f"regenerate.temperature={self.temperature} is negative",
                fix="use 0 (greedy), a positive value, or None (the target's default)",
            )
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(
                f"regenerate.top_p={self.top_p} is not in (0, 1]",
                fix="use a value in (0, 1], or None (the target's default)",
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(
                f"regenerate.dtype={self.dtype!r} is not float32, bfloat16 or float16",
                fix="use float32 on CPU, bfloat16 on GPU",
            )
        if self.fim_order not in ("psm", "spm"):
            raise ConfigError(
                f"regenerate.fim_order={self.fim_order!r} is not 'psm' or 'spm'",
                fix="use 'psm' (default) unless the target was trained on SPM",
            )
        for name in ("concurrency", "retries", "shard_size", "batch_size"):
            value = getattr(self, name)
            low = 0 if name == "retries" else 1
            if value < low:
                raise ConfigError(f"regenerate.{name}={value} is < {low}", fix=f"use >= {low}")
        if not 0.0 <= self.max_server_errors <= 1.0:
            raise ConfigError(
                f"regenerate.max_server_errors={self.max_server_errors} is not in [0, 1]",
                fix="use a fraction such as 0.1",
            )
        for name in ("timeout_s", "retry_backoff_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(
                    f"regenerate.{name}={getattr(self, name)} is not positive",
                    fix="use a positive number of seconds",
                )

    def key_params(self) -> dict[str, Any]:
        """The fields that change the output (operational knobs like concurrency do not)."""
        keep = (
            "backend",
            "target",
            "tokenizer",
            "model",
            "max_new_tokens",
            "temperature",
            "top_p",
            "seed",
            "last_turn_only",
            "fim_order",
            "shard_size",
            "dtype",
        )
        params = {k: getattr(self, k) for k in keep}
        if self.keep_length:  # only when set: older artifacts keep their keys
            params["keep_length"] = True
        if self.backend == "local":
            params["model"] = None
            # batch composition changes float rounding (and which samples share a seed)
            params["batch_size"] = self.batch_size
        else:
            params["dtype"] = None  # the server decides its dtype
        return params

    def provenance(self) -> dict[str, Any]:
        """What marks a regenerated record: the target and the settings (no secrets)."""
        return {
            "stage": STAGE,
            "code": CODE_VERSION,
            "target": self.target,
            "backend": self.backend,
            "model": (self.model or self.target) if self.backend == "server" else None,
            "dtype": self.dtype if self.backend == "local" else None,
            "max_new_tokens": self.max_new_tokens,
            "keep_length": self.keep_length,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "last_turn_only": self.last_turn_only,
            "fim_order": self.fim_order,
        }


# ---- backend interface ---------------------------------------------------------------------


@dataclass(frozen=True)
class GenRequest:
    """One generation: a chat (messages, the backend renders the template) or a raw prompt.

    `stop_ids` are token ids that end the answer besides the backend's own end-of-turn/eos
    (FIM: the end-of-middle token). `seed` is the request's own sampling seed.
    """

    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    stop_ids: tuple[int, ...] = ()
    seed: int = 0


@dataclass
class GenResult:
    """What came back. finish: "stop" (end token), "length" (max_new_tokens), "error"."""

    text: str
    finish: FinishReason
    generated_tokens: int = 0  # including the end token, as servers count usage
    reasoning: str | None = None
    error: str | None = None  # reject reason when finish == "error"


class GenerationBackend(Protocol):
    """Anything that turns requests into results, in request order."""

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]: ...

    def close(self) -> None: ...


# ---- FIM prompts -------------------------------------------------------------------------


def _fim_prompt(tokens: FimTokens, prefix: str, suffix: str, order: str) -> str:
    """The prompt text of `eagle_core.fim.build_fim_sample`'s layout, up to the middle.

    PSM: `<pre> P <suf> S <mid>`; SPM: `<pre> <suf> S <mid> P` (the middle continues the
    prefix directly). The sentinels are special tokens, so tokenizing this text gives the
    ids tokenize trains on.
    """
    if order == "psm":
        return f"{tokens.prefix}{prefix}{tokens.suffix}{suffix}{tokens.middle}"
    return f"{tokens.prefix}{tokens.suffix}{suffix}{tokens.middle}{prefix}"


# ---- model loading -----------------------------------------------------------------------


def _load_tokenizer(cfg: RegenerateConfig) -> Any:
    return load_tokenizer(cfg.tokenizer or cfg.target)


def _end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids the chat template writes right after an assistant message's content.

    Renders a two-turn chat with a marker answer and takes the special tokens that follow
    the marker up to the next piece of text (ChatML: `<|im_end|>`; Llama 3: `<|eot_id|>`).
    """
    marker = "MARKERxyzzy"
    try:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=True,
        )
    except (ValueError, TypeError, KeyError):
        return []
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    text_ids = list(ids)
    special = set(tokenizer.all_special_ids)
    decoded = [tokenizer.decode([i]) for i in text_ids]
    ends: list[int] = []
    joined = ""
    seen_marker = False
    for tid, piece in zip(text_ids, decoded, strict=True):
        joined += piece
        if not seen_marker:
            seen_marker = joined.endswith(marker) or marker in joined
            continue
        if tid in special:
            ends.append(tid)
            break
        if piece.strip():
            break
    return ends


# ---- local backend -----------------------------------------------------------------------


class LocalBackend:
    """transformers `generate`, length-sorted batches, left padding, KV cache."""

    def __init__(self, cfg: RegenerateConfig) -> None:
        import torch

        self.cfg = cfg
        self.tokenizer = _load_tokenizer(cfg)
        self.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_target(cfg.target, dtype=cfg.dtype, device=self.device)
        gen = self.model.generation_config
        eos = gen.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.append(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(set(eos_ids))
        if not self.eos_ids:
            raise ConfigError(
                f"target {cfg.target!r} has no eos token (generation_config and tokenizer)",
                fix="set eos_token_id in the target's generation_config.json or the tokenizer",
            )
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 0)
        if vocab and len(self.tokenizer) > vocab:
            raise ModelMismatchError(
                f"tokenizer {cfg.tokenizer or cfg.target!r} has {len(self.tokenizer)} tokens, "
                f"target {cfg.target!r} only {vocab} embeddings",
                fix="pass the target's own tokenizer (regenerate.tokenizer)",
            )
        self.chat_stop_ids = sorted(set(self.eos_ids) | set(_end_of_turn_ids(self.tokenizer)))
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.max_positions = int(
            getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30
        )
        self.settings = self._resolved_settings()

    def _resolved_settings(self) -> dict[str, Any]:
        gen = self.model.generation_config
        temperature = self.cfg.temperature
        if temperature is None:
            temperature = (gen.temperature or 1.0) if gen.do_sample else 0.0
        top_p = self.cfg.top_p if self.cfg.top_p is not None else (gen.top_p or 1.0)
        top_k = gen.top_k if self.cfg.temperature is None else None
        return {"temperature": temperature, "top_p": top_p, "top_k": top_k}

    def encode(self, req: GenRequest) -> list[int]:
        """Prompt token ids: the chat template for messages, the plain text for raw prompts."""
        if req.messages is not None:
            text = self.tokenizer.apply_chat_template(
                [dict(m) for m in req.messages], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        # raw completions: what an OpenAI-compatible server does with a prompt string
        return self.tokenizer(req.prompt)["input_ids"]

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        import torch
        from transformers import GenerationConfig

        results: list[GenResult | None] = [None] * len(requests)
        encoded = [self.encode(r) for r in requests]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, ids in enumerate(encoded):
            if len(ids) >= self.max_positions:
                results[i] = GenResult("", "error", error="prompt_too_long")
            else:
                groups.setdefault(self.stop_ids(requests[i]), []).append(i)
        s = self.settings
        greedy = s["temperature"] == 0.0
        # one generate call stops every row at the same ids, so requests with different end
        # tokens (chat turns, FIM middles) never share a batch
        for stops, todo in sorted(groups.items()):
            todo.sort(key=lambda i: (len(encoded[i]), i))  # length-sorted: little padding
            for start in range(0, len(todo), self.cfg.batch_size):
                idx = todo[start : start + self.cfg.batch_size]
                width = max(len(encoded[i]) for i in idx)
                input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)  # [B,T]
                mask = torch.zeros((len(idx), width), dtype=torch.long)  # [B, T]
                for row, i in enumerate(idx):
                    ids = encoded[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)  # left padding
                    mask[row, width - len(ids) :] = 1
                gen_cfg = GenerationConfig(
                    max_new_tokens=self.cfg.max_new_tokens,
                    do_sample=not greedy,
                    temperature=None if greedy else s["temperature"],
                    top_p=None if greedy else s["top_p"],
                    top_k=None if greedy else s["top_k"],
                    eos_token_id=list(stops),
                    pad_token_id=self.pad_id,
                    use_cache=True,
                )
                # one seed per batch, derived from its requests: a batch samples the same
                # whether or not the run was resumed
                torch.manual_seed(_derive_seed(self.cfg.seed, *(requests[i].seed for i in idx)))
                with torch.no_grad():
                    out = self.model.generate(
                        input_ids=input_ids.to(self.device),
                        attention_mask=mask.to(self.device),
                        generation_config=gen_cfg,
                    )  # [B, T + new]
                new = out[:, width:].cpu()  # [B, new]
                for row, i in enumerate(idx):
                    results[i] = self._result(new[row].tolist(), set(stops))
        return [r for r in results if r is not None]

    def stop_ids(self, req: GenRequest) -> tuple[int, ...]:
        """Ids that end this request's answer: eos (+ end-of-turn for chat) + its own."""
        base = self.chat_stop_ids if req.messages is not None else self.eos_ids
        return tuple(sorted(set(base) | set(req.stop_ids)))

    def _result(self, ids: list[int], stops: set[int]) -> GenResult:
        """Cut the generated ids [new] at the first stop id (rows that finished early are
        padded after it); no stop id means the row ran into max_new_tokens."""
        for n, tid in enumerate(ids):
            if tid in stops:
                text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
                return GenResult(text, "stop", generated_tokens=n + 1)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return GenResult(text, "length", generated_tokens=len(ids))

    def close(self) -> None:
        self.model = None


def _derive_seed(*parts: Any) -> int:
    h = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()
    return int(h[:8], 16)  # 32 bits: what torch.manual_seed and vLLM accept


# ---- server backend ----------------------------------------------------------------------


class ServerBackend:
    """An OpenAI-compatible endpoint: chat completions for chat, completions for FIM."""

    def __init__(self, cfg: RegenerateConfig) -> None:
        import httpx

        self.cfg = cfg
        base = (cfg.server_url or "").rstrip("/")
        self.base = base if base.endswith("/v1") else f"{base}/v1"
        self.model = cfg.model or cfg.target
        headers = {"Content-Type": "application/json"}
        if cfg.api_key_env is not None:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError(
                    f"environment variable {cfg.api_key_env} (regenerate.api_key_env) is not set",
                    fix=f"export {cfg.api_key_env}=<key> where the stage runs, or set "
                    "api_key_env=None for a server without --api-key",
                )
            headers["Authorization"] = f"Bearer {key}"
        # httpx logs every request at INFO: at millions of requests that drowns the run log
        # (one line per record is what our logging avoids); respect a level set on purpose
        httpx_log = logging.getLogger("httpx")
        if httpx_log.level == logging.NOTSET:
            httpx_log.setLevel(logging.WARNING)
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(cfg.timeout_s),
            limits=httpx.Limits(max_connections=cfg.concurrency),
        )
        self.settings = {"temperature": cfg.temperature, "top_p": cfg.top_p}
        self._fatal: Exception | None = None
        self._lock = threading.Lock()

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        if not requests:
            return []
        with concurrent.futures.ThreadPoolExecutor(self.cfg.concurrency) as pool:
            results = list(pool.map(self._one, requests))
        if self._fatal is not None:
            raise self._fatal
        return results

    def _body(self, req: GenRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.cfg.max_new_tokens,
            "seed": req.seed,
            "n": 1,
        }
        if self.cfg.temperature is not None:
            body["temperature"] = self.cfg.temperature
        if self.cfg.top_p is not None:
            body["top_p"] = self.cfg.top_p
        if req.messages is not None:
            body["messages"] = [dict(m) for m in req.messages]
            return "/chat/completions", body
        body["prompt"] = req.prompt
        if req.stop_ids:
            body["stop_token_ids"] = list(req.stop_ids)  # vLLM / SGLang extension
        return "/completions", body

    def _one(self, req: GenRequest) -> GenResult:
        import httpx

        path, body = self._body(req)
        url = self.base + path
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if self._fatal is not None:
                return GenResult("", "error", error="server_error")
            if attempt:
                wait = min(self.cfg.retry_backoff_s * 2 ** (attempt - 1), _RETRY_BACKOFF_MAX_S)
                time.sleep(wait)
            try:
                resp = self.client.post(url, json=body)
            except httpx.HTTPError as exc:  # timeouts, refused connections, broken streams
                last = f"{type(exc).__name__}"
                continue
            if resp.status_code in (401, 403, 404):
                with self._lock:
                    self._fatal = self._fatal or ConfigError(
                        f"server {url} answered {resp.status_code} for model {self.model!r}",
                        fix="check server_url, the model name (regenerate.model) and the API "
                        "key variable (regenerate.api_key_env)",
                    )
                return GenResult("", "error", error="server_error")
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}"
                continue
            if resp.status_code >= 400:
                log.warning("server refused a request: HTTP %d", resp.status_code)
                return GenResult("", "error", error="bad_request")
            try:
                return _parse_choice(resp.json(), chat=req.messages is not None)
            except (ValueError, KeyError, IndexError, TypeError):
                last = "malformed response"
                continue
        log.warning("request failed after %d tries: %s", self.cfg.retries + 1, last)
        return GenResult("", "error", error="server_error")

    def close(self) -> None:
        self.client.close()


def _parse_choice(doc: dict[str, Any], chat: bool) -> GenResult:
    choice = doc["choices"][0]
    if chat:
        msg = choice["message"]
        text = msg.get("content") or ""
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    else:
        text, reasoning = choice["text"] or "", None
    reason = choice.get("finish_reason")
    usage = doc.get("usage") or {}
    tokens = int(usage.get("completion_tokens") or 0)
    if reason == "stop":
        return GenResult(text, "stop", tokens, reasoning)
    if reason == "length":
        return GenResult(text, "length", tokens, reasoning)
    return GenResult(text, "error", tokens, reasoning, error="server_error")


def make_backend(cfg: RegenerateConfig) -> GenerationBackend:
    """The backend `cfg.backend` names."""
    return LocalBackend(cfg) if cfg.backend == "local" else ServerBackend(cfg)


# ---- records -------------------------------------------------------------------------------


@dataclass
class _Job:
    """One record being regenerated: its messages so far and the turns still to write."""

    row: dict[str, Any]
    messages: list[dict[str, str]] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)  # message indexes to (re)write, ascending
    done_turns: int = 0
    finish: list[str] = field(default_factory=list)
    tokens: int = 0
    reject: str | None = None


def _chat_job(row: dict[str, Any], last_turn_only: bool) -> _Job:
    job = _Job(row)
    try:
        msgs = json.loads(row.get("messages_json") or "null")
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs
        ):
            raise ValueError("not a list of {role, content}")
    except ValueError:
        job.reject = "bad_record"
        return job
    job.messages = [dict(m) for m in msgs]
    turns = [i for i, m in enumerate(msgs) if m.get("role") == "assistant"]
    if msgs and msgs[-1].get("role") == "user":
        job.messages.append({"role": "assistant", "content": ""})
        turns.append(len(msgs))
    if not any(m.get("role") == "user" for m in msgs) or not turns:
        job.reject = "bad_record"
        return job
    job.turns = turns[-1:] if last_turn_only else turns
    return job


def _chat_request(job: _Job, seed: int) -> GenRequest:
    turn = job.turns[job.done_turns]
    history = tuple({"role": m["role"], "content": m["content"]} for m in job.messages[:turn])
    return GenRequest(messages=history, seed=_derive_seed(seed, job.row["sample_id"], turn))


def _apply(job: _Job, res: GenResult, keep_length: bool) -> None:
    job.tokens += res.generated_tokens
    job.finish.append(res.finish)
    if res.finish == "error":
        job.reject = res.error or "server_error"
    elif res.finish == "length" and not keep_length:
        job.reject = "length"
    elif not res.text.strip():
        job.reject = "empty"


def _regenerate_rows(
    rows: list[dict[str, Any]],
    backend: GenerationBackend,
    cfg: RegenerateConfig,
    fim_tokens: Callable[[], FimTokens],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Regenerate one shard's rows. Returns (kept rows in input order, stats)."""
    stats: dict[str, Any] = {
        "samples": len(rows),
        "kept": 0,
        "passthrough": 0,
        "requests": 0,
        "generated_tokens": 0,
        "finish_stop": 0,
        "finish_length": 0,
        "finish_error": 0,
    }
    stats.update({f"rejected_{r}": 0 for r in REJECT_REASONS})
    jobs: list[_Job] = []
    for row in rows:
        kind = row.get("kind")
        if kind == "chat":
            jobs.append(_chat_job(row, cfg.last_turn_only))
        elif kind == "fim":
            job = _Job(row)
            if row.get("prefix") is None or row.get("suffix") is None:
                job.reject = "bad_record"
            jobs.append(job)
        elif kind == "tokens":  # pre-tokenized: nothing to regenerate, passed through
            jobs.append(_Job(row))
        else:
            jobs.append(_Job(row, reject="bad_record"))

    # round 0: every FIM middle and every chat's first turn; round r: chats' r-th turns
    round_no = 0
    while True:
        batch: list[tuple[_Job, GenRequest]] = []
        for job in jobs:
            if job.reject is not None:
                continue
            kind = job.row.get("kind")
            if kind == "chat" and job.done_turns < len(job.turns):
                batch.append((job, _chat_request(job, cfg.seed)))
            elif kind == "fim" and round_no == 0:
                tokens = fim_tokens()
                prompt = _fim_prompt(tokens, job.row["prefix"], job.row["suffix"], cfg.fim_order)
                seed = _derive_seed(cfg.seed, job.row["sample_id"], "fim")
                req = GenRequest(prompt=prompt, stop_ids=(tokens.end_id,), seed=seed)
                batch.append((job, req))
        if not batch:
            break
        results = backend.generate([req for _, req in batch])
        stats["requests"] += len(batch)
        for (job, _req), res in zip(batch, results, strict=True):
            stats[f"finish_{res.finish}"] += 1
            _apply(job, res, cfg.keep_length)
            if job.row.get("kind") == "chat":
                turn = job.turns[job.done_turns]
                msg = {"role": "assistant", "content": res.text}
                if res.reasoning:
                    msg["reasoning"] = res.reasoning
                job.messages[turn] = msg
                job.done_turns += 1
            else:
                job.row = {**job.row, "_middle": res.text}
        round_no += 1

    provenance = cfg.provenance()
    kept: list[dict[str, Any]] = []
    examples: dict[str, list[str]] = {}
    for job in jobs:
        stats["generated_tokens"] += job.tokens
        if job.reject is not None:
            stats[f"rejected_{job.reject}"] += 1
            ids = examples.setdefault(job.reject, [])
            if len(ids) < _MAX_REJECT_EXAMPLES:
                ids.append(str(job.row.get("sample_id")))
            continue
        row = dict(job.row)
        kind = row.get("kind")
        if kind == "tokens":
            stats["passthrough"] += 1
            kept.append(row)
            continue
        original = _original(row)
        if kind == "chat":
            row["messages_json"] = json.dumps(job.messages, ensure_ascii=False)
        else:
            row["middle"] = row.pop("_middle")
        row["original_json"] = json.dumps(
            {
                **original,
                "generated_by": provenance,
                "finish": job.finish,
                "generated_tokens": job.tokens,
            },
            ensure_ascii=False,
            sort_keys=True,
        )
        kept.append(row)
    failed = stats["rejected_server_error"]
    if failed > cfg.max_server_errors * stats["requests"]:
        raise DataError(
            f"{failed} of {stats['requests']} requests failed after {cfg.retries} retries "
            f"(more than max_server_errors={cfg.max_server_errors}); server down or overloaded?",
            fix="check that the server answers at server_url, then rerun: finished shards are "
            "kept and this one is redone",
        )
    stats["kept"] = len(kept)
    for row in kept:  # per kind, like download's counts (tokenize checks them)
        stats[f"kept_{row.get('kind')}"] = stats.get(f"kept_{row.get('kind')}", 0) + 1
    stats["reject_examples"] = examples
    stats["rejected"] = sum(stats[f"rejected_{r}"] for r in REJECT_REASONS)
    return kept, stats


def _original(row: dict[str, Any]) -> dict[str, Any]:
    """The answer as downloaded; an earlier regenerate's original wins (it is the source)."""
    if row.get("original_json"):
        prev = json.loads(row["original_json"])
        return {k: v for k, v in prev.items() if k in ("messages", "middle")}
    if row.get("kind") == "chat":
        return {"messages": json.loads(row["messages_json"])}
    return {"middle": row.get("middle")}


# ---- the stage -----------------------------------------------------------------------------


def _input_shards(store: ArtifactStore, ref: StageRef) -> tuple[list[str], pa.Schema, int]:
    names = store.list_files(ref, suffix=".parquet")
    if not names:
        raise DataError(
            f"records artifact {ref.url} has no Parquet shards",
            fix="run download again (it writes shard-*.parquet)",
        )
    total = 0
    for name in names:
        with store.open(ref, name) as fh:
            pf = pq.ParquetFile(fh)
            total += pf.metadata.num_rows
            missing = set(RECORD_SCHEMA.names) - set(pf.schema_arrow.names)
        if missing:
            raise DataError(
                f"{ref.url}/{name} lacks the record columns {sorted(missing)}",
                fix="pass the output of the download stage (records), not another stage's",
            )
    return names, RECORD_SCHEMA, total


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def _stats_name(i: int) -> str:
    return f"stats/shard-{i:05d}.json"


def regenerate_key(store: ArtifactStore, records_ref: StageRef, cfg: RegenerateConfig) -> str:
    """The stage key. The local backend runs the target's weights as they are now, so their
    fingerprint is in it (a target updated in place regenerates); a server is known by its
    model name only."""
    fingerprints = None
    if cfg.backend == "local":
        from storage.fingerprint import model_fingerprint

        fingerprints = {"target": model_fingerprint(cfg.target)}
    return store.key(
        STAGE, cfg.key_params(), inputs=[records_ref], code=CODE_VERSION, fingerprints=fingerprints
    )


def regenerate(
    store: ArtifactStore,
    records_ref: StageRef,
    cfg: RegenerateConfig,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    backend: GenerationBackend | None = None,
) -> StageRef:
    """Replace the answers of `records_ref` with the target's own; resumable per shard.

    Args:
        store: where the artifact goes (`<root>/regenerate/<key>/`).
        records_ref: a `download` artifact (records Parquet shards).
        cfg: backend and generation settings.
        force: redo every shard even if an artifact or a journal exists.
        progress: called as progress(records_done, records_total) after each shard.
        backend: an already built backend (tests, notebooks); None builds `cfg.backend`.

    Returns:
        The artifact's ref; counts: samples, kept, passthrough, rejected and
        rejected_<reason>, requests, generated_tokens, finish_stop/length/error,
        generate_s and tokens_per_s (of the shards generated by this run), shards.
    """
    key = regenerate_key(store, records_ref, cfg)
    if store.is_done(STAGE, key) and not force:
        log.info("regenerate %s: cached", key)
        return store.ref(STAGE, key)
    names, schema, total = _input_shards(store, records_ref)
    n_shards = max(1, -(-total // cfg.shard_size))
    log.info(
        "regenerate %s: %d records -> %d shards (%s backend, target %s)",
        key,
        total,
        n_shards,
        cfg.backend,
        cfg.target,
    )
    own_backend = backend is None
    state: dict[str, Any] = {"backend": backend, "fim": None}

    def get_backend() -> GenerationBackend:
        if state["backend"] is None:
            state["backend"] = make_backend(cfg)
        return state["backend"]

    def fim_tokens() -> FimTokens:
        # the server backend needs the tokenizer only for FIM records: loaded on first use
        if state["fim"] is None:
            tok = getattr(state["backend"], "tokenizer", None) or _load_tokenizer(cfg)
            state["fim"] = discover_fim_tokens(tok)
        return state["fim"]

    totals: dict[str, Any] = {}
    examples: dict[str, list[str]] = {}
    gen_s = 0.0
    gen_tokens_this_run = 0
    meta = {"provenance": cfg.provenance()}
    try:
        with store.publish(
            STAGE, key, params=cfg.key_params(), inputs=[records_ref], force=force
        ) as w:
            shard_rows: list[dict[str, Any]] = []
            shard_i = 0
            done = 0

            def finish_shard(rows: list[dict[str, Any]], i: int) -> None:
                nonlocal gen_s, gen_tokens_this_run, done
                name, stats_name = _shard_name(i), _stats_name(i)
                if w.has(name) and w.has(stats_name):
                    with store.fs.open(store.path(STAGE, key, stats_name), "rb") as fh:
                        stats = json.load(fh)
                    log.debug("regenerate %s: %s kept from an earlier run", key, name)
                else:
                    t0 = time.perf_counter()
                    kept, stats = _regenerate_rows(rows, get_backend(), cfg, fim_tokens)
                    elapsed = time.perf_counter() - t0
                    gen_s += elapsed
                    gen_tokens_this_run += stats["generated_tokens"]
                    table = pa.Table.from_pylist(kept, schema=schema).replace_schema_metadata(
                        {b"eagle.meta": json.dumps(meta, sort_keys=True).encode()}
                    )
                    write_parquet(w, name, table)
                    w.write_bytes(
                        stats_name, json.dumps(stats, sort_keys=True).encode(), journal=True
                    )
                    log.debug("regenerate %s: %s %s", key, name, stats)
                for reason, ids in stats.pop("reject_examples", {}).items():
                    known = examples.setdefault(reason, [])
                    known.extend(ids[: max(0, _MAX_REJECT_EXAMPLES - len(known))])
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0) + v
                done += len(rows)
                if progress is not None:
                    progress(done, total)

            for batch in iter_batches(store, records_ref, names=names, batch_size=256):
                for row in batch.to_pylist():
                    shard_rows.append({k: row.get(k) for k in schema.names})
                    if len(shard_rows) == cfg.shard_size:
                        finish_shard(shard_rows, shard_i)
                        shard_rows, shard_i = [], shard_i + 1
            if shard_rows or shard_i == 0:
                finish_shard(shard_rows, shard_i)
                shard_i += 1

            if totals.get("samples", 0) and not totals.get("kept", 0):
                raise DataError(
                    f"regenerate kept none of {totals['samples']} records "
                    f"({ {k: v for k, v in totals.items() if k.startswith('rejected_') and v} })",
                    fix="raise max_new_tokens (or set keep_length) if most were cut at the length "
                    "limit; check the "
                    "target and the server otherwise",
                )
            totals["shards"] = shard_i
            # the same counts a download artifact has, so tokenize reads either the same way
            totals["rows"] = totals.get("kept", 0)
            totals["by_kind"] = {
                k.removeprefix("kept_"): v
                for k, v in sorted(totals.items())
                if k.startswith("kept_") and v
            }
            totals["generate_s"] = round(gen_s, 3)
            totals["tokens_per_s"] = round(gen_tokens_this_run / gen_s, 2) if gen_s else None
            w.counts.update(totals)
            w.meta.update(meta)
            w.meta["settings"] = getattr(state["backend"], "settings", None)
            w.meta["server_url"] = cfg.server_url
            w.meta["reject_examples"] = examples
    finally:
        if own_backend and state["backend"] is not None:
            state["backend"].close()
    for reason in REJECT_REASONS:
        if totals.get(f"rejected_{reason}"):
            log.warning(
                "regenerate %s: %d records rejected (%s)", key, totals[f"rejected_{reason}"], reason
            )
    log.info(
        "regenerate %s: done, %d of %d records kept, %s generated tokens (%s tok/s)",
        key,
        totals.get("kept", 0),
        totals.get("samples", 0),
        totals.get("generated_tokens"),
        totals.get("tokens_per_s"),
    )
    return store.ref(STAGE, key)


def stats_rows(counts: dict[str, Any]) -> list[dict[str, Any]]:
    """The counts as table rows (metric, value) for a UI table artifact."""
    return [{"metric": k, "value": v} for k, v in sorted(counts.items())]


__all__ = [
    "CODE_VERSION",
    "REJECT_REASONS",
    "GenRequest",
    "GenResult",
    "GenerationBackend",
    "LocalBackend",
    "RegenerateConfig",
    "ServerBackend",
    "make_backend",
    "regenerate",
    "stats_rows",
]
