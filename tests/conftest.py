"""Session fixtures shared by every test package.

`prefect_server` is the one Prefect test harness (a real server) of the session: started on
first use by a test that asks for it (tests/tasks, tests/flows), never by the others.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from storage import ArtifactStore, StageRef

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# moto needs credentials to exist; they are fake and only ever reach the loopback server
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API server (moto) on loopback, any free port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """A real Prefect server for the session (`prefect_test_harness`); yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield str(PREFECT_API_URL.value())


@pytest.fixture
def s3_root(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request) -> str:
    """A fresh bucket on the loopback S3 server; returns its s3:// root URL."""
    import uuid

    import boto3

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    monkeypatch.setenv("EAGLE_PIPELINE_S3_ENDPOINT", s3_endpoint)
    import fsspec

    fsspec.config.conf.pop("s3", None)
    return f"s3://{bucket}/artifacts"


# ---- the small test target (eagle_core/demo) ------------------------------------------------
# Built once per session from a handful of stdlib modules in a few seconds: a real byte-level
# BPE tokenizer (1024 tokens; eos <|endoftext|>, pad <|pad|>, bos <|bos|> never auto-added,
# ChatML <|im_start|>/<|im_end|> template with {% generation %} around assistant content +
# <|im_end|>, StarCoder FIM tokens, a middle ends with <|endoftext|>) and an 8-layer Llama
# (H=64, 4 heads, 2 kv heads, intermediate 128) trained 60 steps. Conventions:
# eagle_core/demo/tokenizer.py.


@pytest.fixture(scope="session")
def _small_target(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    from eagle_core.demo.build import build_small_target

    return build_small_target(str(tmp_path_factory.mktemp("small_target")))


@pytest.fixture(scope="session")
def small_tokenizer_dir(_small_target: tuple[str, str]) -> str:
    """HF tokenizer dir (AutoTokenizer.from_pretrained loads it)."""
    return _small_target[0]


@pytest.fixture(scope="session")
def small_target_dir(_small_target: tuple[str, str]) -> str:
    """HF LlamaForCausalLM dir (config.json + model.safetensors), vocab = the tokenizer's."""
    return _small_target[1]


# ---- an exported draft (evaluate tests) ----------------------------------------------------


@pytest.fixture
def export_untrained_draft() -> Callable[..., StageRef]:
    """`export_untrained_draft(store, target_ref, **export_fields) -> StageRef` of an export.

    Builds a seeded, untrained EAGLE-3 draft (draft vocab 512) of `target_ref` (a path or a
    demo-target artifact URL), publishes it as the "train" artifact "run" of `store` with
    `meta.target = target_ref`, and exports it: ExportConfig(dtype="float32", **export_fields).
    An untrained draft still decodes losslessly, so evaluate tests can measure it.
    """
    import torch
    from safetensors.torch import save_file

    from eagle_core.draft import DraftConfig, build_draft
    from eagle_core.export import ExportConfig, export
    from eagle_core.models import load_target

    def export_draft(store: ArtifactStore, target_ref: str, /, **export_fields: Any) -> StageRef:
        model = load_target(target_ref)
        torch.manual_seed(0)
        cfg = DraftConfig.from_target_config(model.config, draft_vocab_size=512)
        draft = build_draft(cfg, target_model=model)
        with store.publish("train", "run") as w:
            w.write_file(
                "final/draft.safetensors", lambda p: save_file(dict(draft.state_dict()), p)
            )
            w.write_json("final/draft_config.json", cfg.to_dict())
            w.meta.update(target=target_ref)
        run = store.ref("train", "run")
        return export(store, run, ExportConfig(dtype="float32", **export_fields))

    return export_draft
