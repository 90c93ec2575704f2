"""User-given URLs: the fsspec options every opener uses, and redaction of credentials.

Standard library only at import time (storage.errors imports it); fsspec is imported lazily.

- `fs_options(url)`: the storage options for opening `url` with fsspec, the same ones the
  artifact store uses (an S3 endpoint from `$EAGLE_PIPELINE_S3_ENDPOINT` for s3:// URLs;
  credentials stay in the environment). Every place that opens a user-given URL (data
  sources, prompt files, artifact roots) calls it, so one variable points them all at MinIO.
- `redact_url(url)` / `redact_text(text)`: a URL's userinfo (`user:password@`) and the values
  of secret-looking query parameters (`token=`, `sig=`, `X-Amz-Signature=`, ...) become
  `***`. Every error message (`PipelineError`), the store's log lines and the CLI's output
  go through them; `install_log_redaction` does the same for every log record of a process.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Iterable
from typing import Any

ENV_S3_ENDPOINT = "EAGLE_PIPELINE_S3_ENDPOINT"  # for MinIO / moto; credentials stay in env
MASK = "***"
# object stores whose URL authority is a bucket: a `user:secret@` there cannot work (the
# whole `user:secret@bucket` would be taken as the bucket name), so the store refuses it
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "oss", "r2"})
# schemes whose bare `user@` is a credential (a token given as the user name)
_USER_IS_SECRET = frozenset({"http", "https", "ftp", "ftps", "sftp", "ssh", "webdav", "dav"})
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*"
_URL_RE = re.compile(rf"\b({_SCHEME})://([^\s'\"<>`,;()\[\]{{}}]*)")
# query parameter names whose values are secrets (matched case-insensitively, as substrings)
_SECRET_PARAM = re.compile(
    r"token|secret|passw|pwd|sig|signature|credential|auth|session|apikey|api_key|"
    r"api-key|access_key|private|^key$|^code$|^x-amz-|^x-goog-",
    re.IGNORECASE,
)


def protocol_of(url: str) -> str:
    """The URL's scheme, lower-cased ("" for a plain local path)."""
    m = re.match(rf"^({_SCHEME})://", url)
    return m.group(1).lower() if m else ""


def fs_options(url: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """fsspec storage options for opening `url` (a copy of `base` plus the defaults).

    s3:// and s3a:// URLs get `client_kwargs.endpoint_url` from `$EAGLE_PIPELINE_S3_ENDPOINT`
    unless `base` sets one; object stores get `use_listings_cache=False` (a listing cached by
    this process would hide a manifest another process published afterwards).
    """
    opts = dict(base or {})
    protocol = protocol_of(url)
    if protocol in ("s3", "s3a") and os.environ.get(ENV_S3_ENDPOINT):
        client_kwargs = dict(opts.get("client_kwargs") or {})  # never mutate the caller's
        client_kwargs.setdefault("endpoint_url", os.environ[ENV_S3_ENDPOINT])
        opts["client_kwargs"] = client_kwargs
    if protocol in OBJECT_STORE_PROTOCOLS | {"az", "abfs", "abfss", "adl"}:
        opts.setdefault("use_listings_cache", False)
    return opts


def _split_userinfo(scheme: str, rest: str) -> tuple[str, str]:
    """(userinfo, rest after `@`) of the part of a URL after `scheme://`; ("", rest) if none.

    A secret may hold `/` (AWS secret keys do), so the authority is not cut at the first `/`:
    text before the first `@` is userinfo when it has no `/`, or when it has a `:` (a
    `user:password` whose password holds a `/`). A bare user name counts only for schemes
    where it is a credential (http tokens); `abfs://container@account` keeps its container.
    """
    at = rest.find("@")
    if at <= 0:
        return "", rest
    pre = rest[:at]
    if "/" in pre:
        first = pre.split("/", 1)[0]
        if ":" not in first or first.rpartition(":")[2].isdigit():
            return "", rest  # an `@` inside the path (s3://bucket/model@v2, http://h:80/a@b)
    if ":" not in pre and scheme.lower() not in _USER_IS_SECRET:
        return "", rest
    return pre, rest[at + 1 :]


def _redact_query(query: str) -> str:
    parts = []
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        if eq and value and _SECRET_PARAM.search(urllib.parse.unquote_plus(name)):
            value = MASK
        parts.append(f"{name}{eq}{value}")
    return "&".join(parts)


def redact_url(url: str) -> str:
    """`url` with its userinfo and secret-looking query values replaced by `***`.

    `s3://KEY:SECRET@bucket/x` -> `s3://***@bucket/x`;
    `https://h/f?X-Amz-Signature=abc&v=1` -> `https://h/f?X-Amz-Signature=***&v=1`.
    Plain paths and URLs without credentials come back unchanged.
    """
    m = re.match(rf"^({_SCHEME})://(.*)$", url, re.DOTALL)
    if not m:
        return url
    scheme, rest = m.group(1), m.group(2)
    userinfo, rest = _split_userinfo(scheme, rest)
    head = f"{scheme}://{MASK}@" if userinfo else f"{scheme}://"
    path, qmark, query = rest.partition("?")
    if qmark:
        query, hash_, frag = query.partition("#")
        rest = f"{path}?{_redact_query(query)}{hash_}{frag}"
    return head + rest


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Every URL in `text` redacted (see `redact_url`), and each literal of `secrets` masked."""
    out = _URL_RE.sub(lambda m: redact_url(m.group(0)), text) if "://" in text else text
    for s in secrets:
        if s and len(s) >= 4:  # a 1-3 character "secret" would mask half of every message
            out = out.replace(s, MASK)
    return out


def url_secrets(url: str) -> list[str]:
    """The secret strings in `url` (userinfo password/user, secret query values), raw and
    percent-decoded: what must never be printed even outside a URL's shape."""
    m = re.match(rf"^({_SCHEME})://(.*)$", url, re.DOTALL)
    if not m:
        return []
    scheme, rest = m.group(1), m.group(2)
    found: list[str] = []
    userinfo, rest = _split_userinfo(scheme, rest)
    if userinfo:
        user, _, password = userinfo.partition(":")
        found += [password, userinfo] if password else [user]
    _path, qmark, query = rest.partition("?")
    if qmark:
        for item in query.partition("#")[0].split("&"):
            name, eq, value = item.partition("=")
            if eq and value and _SECRET_PARAM.search(urllib.parse.unquote_plus(name)):
                found.append(value)
    out: list[str] = []
    for s in found:
        for v in (s, urllib.parse.unquote(s), urllib.parse.unquote_plus(s)):
            if v and v not in out:
                out.append(v)
    return out


def has_credentials(url: str) -> bool:
    """True if `url` carries userinfo or a secret-looking query parameter."""
    return redact_url(url) != url


# ---- log records ------------------------------------------------------------------------------
_LOG_SECRETS: list[str] = []


def _redact_record(record: logging.LogRecord) -> None:
    """Rewrite a record in place: its message (formatted once, as QueueHandler does) and a
    logged traceback, redacted. Untouched when there is nothing to redact."""
    try:
        msg = record.getMessage()
    except Exception:  # noqa: BLE001 (a bad format string is logging's error to report)
        return
    red = redact_text(msg, _LOG_SECRETS)
    if red != msg:
        # msg/args themselves, not only getMessage(): a handler that fails prints them raw
        record.msg, record.args = red, None
    if record.exc_info and not record.exc_text:
        # formatters reuse a set exc_text: the traceback text is redacted once, here
        record.exc_text = redact_text(
            logging.Formatter().formatException(record.exc_info), _LOG_SECRETS
        )


def install_log_redaction(secrets: Iterable[str] = ()) -> None:
    """Redact URLs (and these literal secrets) in the message of every log record this
    process creates from now on, whichever handler (console, Prefect API, pytest) gets it.

    Idempotent; later calls add secrets. The message and a logged traceback are redacted.
    """
    for s in secrets:
        if s and s not in _LOG_SECRETS:
            _LOG_SECRETS.append(s)
    old = logging.getLogRecordFactory()
    if getattr(old, "_eagle_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = old(*args, **kwargs)
        _redact_record(record)
        return record

    factory._eagle_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def redact_obj(obj: Any) -> Any:
    """A JSON-like value with every string URL-redacted (manifest params)."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v) for v in obj]
    return obj


__all__ = [
    "ENV_S3_ENDPOINT",
    "MASK",
    "fs_options",
    "has_credentials",
    "install_log_redaction",
    "protocol_of",
    "redact_obj",
    "redact_text",
    "redact_url",
    "url_secrets",
]
