"""storage.urls: credentials in URLs are redacted wherever the store prints a URL (errors,
logs, StageRef, manifests), object-store roots carrying them are refused, and every opener
gets the store's fsspec options."""

from __future__ import annotations

import logging
import uuid

import pytest

from storage import ArtifactError, ArtifactStore, PipelineError, StageRef, StoreError
from storage.urls import fs_options, install_log_redaction, redact_text, redact_url, url_secrets


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("s3://AKIAKEY:SECRET@bucket/x", "s3://***@bucket/x"),
        ("s3://AKIAKEY:sec/ret+x@bucket/x", "s3://***@bucket/x"),  # AWS secrets hold '/'
        ("https://user:pass@host:8443/a?b=1", "https://***@host:8443/a?b=1"),
        ("https://ghp_token@github.com/o/r", "https://***@github.com/o/r"),
        (
            "https://h/f?X-Amz-Signature=abc&v=1&access_token=t&sig=s#frag",
            "https://h/f?X-Amz-Signature=***&v=1&access_token=***&sig=***#frag",
        ),
        ("s3://bucket/x?token=abc", "s3://bucket/x?token=***"),
        # not credentials: unchanged
        ("s3://bucket/model@v2/x", "s3://bucket/model@v2/x"),
        ("http://host:8080/a@b", "http://host:8080/a@b"),
        ("abfs://container@account.dfs.core.windows.net/x", None),
        ("https://h/f?page=2&sort=asc", None),
        ("/tmp/dir/a@b:c", None),
        ("relative/path", None),
    ],
)
def test_redact_url(url: str, want: str | None) -> None:
    assert redact_url(url) == (want or url)


def test_redact_text_finds_urls_and_known_secrets() -> None:
    text = "cannot read 's3://K:CANARY1@b/x' (via https://u:CANARY2@h/r?token=CANARY3), key CANARY4"
    out = redact_text(text, secrets=["CANARY4"])
    assert "***" in out and "s3://***@b/x" in out
    for c in ("CANARY1", "CANARY2", "CANARY3", "CANARY4"):
        assert c not in out
    assert redact_text("no url here", secrets=["ab"]) == "no url here"  # too short to mask


def test_url_secrets_raw_and_decoded() -> None:
    got = url_secrets("https://me:p%40ss%2Fword@h/x?token=t0k3n&v=1")
    assert "p%40ss%2Fword" in got and "p@ss/word" in got and "t0k3n" in got
    assert url_secrets("s3://bucket/x") == [] and url_secrets("/a/b") == []


def test_fs_options_match_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EAGLE_PIPELINE_S3_ENDPOINT", "http://127.0.0.1:9000")
    opts = fs_options("s3://bucket/prompts.jsonl")
    assert opts["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9000"}
    assert opts["use_listings_cache"] is False
    base = {"client_kwargs": {"region_name": "eu-west-1"}}
    merged = fs_options("s3a://b/x", base)
    assert merged["client_kwargs"] == {
        "region_name": "eu-west-1",
        "endpoint_url": "http://127.0.0.1:9000",
    }
    assert base == {"client_kwargs": {"region_name": "eu-west-1"}}  # caller's dict untouched
    explicit = fs_options("s3://b/x", {"client_kwargs": {"endpoint_url": "http://other"}})
    assert explicit["client_kwargs"]["endpoint_url"] == "http://other"
    assert fs_options("/local/file.jsonl") == {} and fs_options("https://h/x") == {}
    store = ArtifactStore("s3://bucket/root")  # the store takes the same options
    assert store.storage_options == fs_options("s3://bucket/root")
    monkeypatch.delenv("EAGLE_PIPELINE_S3_ENDPOINT")
    assert "client_kwargs" not in fs_options("s3://bucket/x")


def test_pipeline_errors_never_echo_a_url_credential() -> None:
    canary = f"canary{uuid.uuid4().hex}"
    err = ArtifactError(
        f"'https://u:{canary}@h/r/download/k' is missing", fix=f"see s3://K:{canary}@b"
    )
    for text in (str(err), err.what, err.fix, repr(err)):
        assert canary not in text
    assert "https://***@h/r/download/k" in err.what


@pytest.mark.parametrize(
    "root",
    ["s3://AKIAKEY:{c}@bucket/x", "s3://bucket/x?token={c}", "gs://user:{c}@bucket/x"],
)
def test_object_store_root_with_credentials_is_refused(root: str, caplog) -> None:
    canary = f"canary{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StoreError) as exc:
        ArtifactStore(root.format(c=canary))
    assert "credentials" in str(exc.value) and "AWS_SECRET_ACCESS_KEY" in exc.value.fix
    assert canary not in str(exc.value) and canary not in caplog.text


def test_store_refs_errors_and_manifests_redact(caplog, tmp_path) -> None:
    """An http root with `user:password@` (read-only, e.g. a web server over published
    artifacts) keeps working, but the password never prints; a data URL's token in a
    stage's parameters is not persisted in the manifest."""
    canary = f"canary{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)
    http = ArtifactStore(f"https://reader:{canary}@127.0.0.1:9/root")
    assert canary in http.root  # the URL itself still carries them, for reading
    assert not http.is_done("download", "k")
    with pytest.raises(ArtifactError) as exc:
        http.manifest("download", "k")
    assert "https://***@127.0.0.1:9/root/download/k" in str(exc.value)
    ref = StageRef(stage="download", key="k", url=http.url("download", "k"))
    assert canary not in repr(ref) and canary not in str(ref) and canary not in f"{[ref]}"
    assert "***@" in repr(ref)

    store = ArtifactStore(str(tmp_path / "store"))
    params = {"source": f"https://h/data.jsonl?token={canary}", "n": 1}
    with store.publish("download", "k1", params=params) as w:
        w.write_bytes("a.txt", b"x")
    m = store.manifest("download", "k1")
    assert m.params["source"] == "https://h/data.jsonl?token=***" and m.params["n"] == 1
    assert canary not in (tmp_path / "store/download/k1/manifest.json").read_text()
    assert "published" in caplog.text and canary not in caplog.text


def test_install_log_redaction_covers_every_handler(caplog) -> None:
    canary = f"canary{uuid.uuid4().hex}"
    install_log_redaction([f"bare-{canary}"])
    install_log_redaction()  # idempotent
    caplog.set_level(logging.INFO)
    logging.getLogger("eagle_core.some_stage").info(
        "reading %s then %s", f"s3://K:{canary}@b/x", f"bare-{canary}"
    )
    assert "reading s3://***@b/x then ***" in caplog.text and canary not in caplog.text
    # msg/args themselves, not only getMessage(): a handler that fails prints them raw
    (record,) = [r for r in caplog.records if r.name == "eagle_core.some_stage"]
    assert canary not in f"{record.msg!r} {record.args!r}"
    try:
        raise FileNotFoundError(f"https://u:{canary}@h/x")
    except FileNotFoundError:
        logging.getLogger("eagle_core.some_stage").exception("failed")
    assert "FileNotFoundError: https://***@h/x" in caplog.text and canary not in caplog.text


def test_stageref_repr_is_unchanged_without_credentials() -> None:
    ref = StageRef(stage="tokenize", key="abc", url="/tmp/store/tokenize/abc", counts={"rows": 1})
    assert repr(ref) == (
        "StageRef(stage='tokenize', key='abc', url='/tmp/store/tokenize/abc', counts={'rows': 1})"
    )
    assert StageRef.from_dict(ref.to_dict()) == ref
    assert isinstance(StoreError("x", fix="y"), PipelineError)
