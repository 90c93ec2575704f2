"""The regenerate stage's server backend against a real `vllm serve` (CPU build, its own venv
from `.ci/engine-venv vllm`) on loopback: the records it writes equal the local backend's.

The target memorises the answers of test_regenerate.py (so greedy output is known and ends
at the end-of-turn / end-of-middle token), with 2 attention heads (head dim 32: vLLM's CPU
attention runs head dims >= 32) and `<|im_end|>` in its generation config's eos list, as
chat models ship it: a server stops a chat turn at the tokens listed there.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from eagle_core.regenerate import regenerate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, os.path.dirname(__file__))
from engines import engine_python  # noqa: E402
from test_regenerate import _cfg, _read, _records, _server_cfg, _store_records, memorised_model  # noqa: E402

SERVER_START_TIMEOUT_S = 240  # engine start is 20-50 s on 2 busy cores; import adds ~10 s


@pytest.fixture(scope="module")
def vllm_target(small_tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """test_regenerate's memorising 2-layer Llama, with 2 heads of dim 32."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_tokenizer_dir)
    model = memorised_model(tok, steps=200, num_attention_heads=2, num_key_value_heads=1)
    model.eval()
    model.generation_config.eos_token_id = [
        tok.eos_token_id,
        tok.convert_tokens_to_ids("<|im_end|>"),
    ]
    out = str(tmp_path_factory.mktemp("memorised_vllm") / "model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(vllm_target: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vllm serve` of the target on 127.0.0.1:<free port>; killed (its whole process group)
    at the end, whatever happened. Yields the base URL."""
    python = engine_python("vllm")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm_serve") / "server.log"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    cmd = [
        # what `vllm serve` runs; the `vllm` CLI itself looks up the "vllm" distribution,
        # which is "vllm-cpu" here, and exits
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        vllm_target,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        "test-model",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "512",
    ]
    with open(log_path, "w") as log_fh:
        proc = subprocess.Popen(
            cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"vllm serve exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}"
                )
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vllm serve not healthy after {SERVER_START_TIMEOUT_S} s:\n"
                    f"{log_path.read_text()[-3000:]}"
                )
            time.sleep(1)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_regenerate_through_vllm_serve_equals_local_greedy(
    vllm_target: str, vllm_server: str, tmp_path
) -> None:
    store, records = _store_records(str(tmp_path), _records())
    local = regenerate(store, records, _cfg(vllm_target))
    served = regenerate(store, records, _server_cfg(vllm_target, vllm_server, concurrency=3))
    a, b = _read(store, local), _read(store, served)
    assert set(a) == set(b)
    for sid in a:
        for col in ("messages_json", "prefix", "middle", "suffix", "input_ids"):
            assert a[sid][col] == b[sid][col], (sid, col)
    for k in ("samples", "kept", "requests", "finish_stop", "finish_length", "rejected_empty"):
        assert local.counts[k] == served.counts[k], k
    assert served.counts["finish_stop"] == served.counts["requests"] == 7
    # vLLM counts the end token in its usage, as the local backend does
    assert served.counts["generated_tokens"] == local.counts["generated_tokens"]
