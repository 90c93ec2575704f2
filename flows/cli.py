"""`eagle-pipeline`: every stage as a subcommand, the whole DAG (`run`, `demo`), and the UI.

Conventions: progress and logs go to stderr; the LAST line of stdout is the URL of the
artifact the command produced (so `url=$(eagle-pipeline tokenize ... | tail -n1)` chains
stages in a shell). A `PipelineError` exits with status 2 and its message (what, where, fix).

Stage subcommands call the `eagle_core` entry points directly (no Prefect needed); `run`
and `demo` run the `retrain` flow, in Prefect's ephemeral mode when no server is configured
and against `PREFECT_API_URL` when one is.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

# Before Prefect is imported: the ephemeral server can take a while to start on a loaded
# 2-core machine, and the core's loggers should reach the flow-run log.
_ENV_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "eagle_core,storage",
    "TOKENIZERS_PARALLELISM": "false",
}

log = logging.getLogger("eagle_pipeline.cli")
# exceptions of these libraries are network / object-store failures, whatever their class
_IO_ERROR_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "httpx", "s3fs")
# third-party loggers whose DEBUG output can hold credentials (see main)
_QUIET_WHEN_VERBOSE = ("botocore", "boto3", "aiobotocore", "s3fs", "urllib3", "gcsfs", "adlfs")


def _set_env_defaults() -> None:
    for k, v in _ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    # DeepSpeed JIT-builds its CPU comm op once: keep it in the venv, where `make` puts it
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    os.environ.setdefault("DS_BUILD_OPS", "0")


# ---- options generated from the pydantic form sections --------------------------------------
def _add_section_options(
    parser: argparse.ArgumentParser, model: type, skip: Sequence[str] = ()
) -> None:
    """One `--field-name` option per scalar field of a `flows.params` section (its
    description is the help, Literal choices are `choices`, defaults stay the model's)."""
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        ann = info.annotation
        args = typing.get_args(ann)
        opt = "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"dest": name, "default": None, "help": info.description}
        if typing.get_origin(ann) is typing.Literal:
            kw["choices"] = list(args)
            kw["type"] = type(args[0])
        elif ann is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif ann in (int, float, str):
            kw["type"] = ann
        elif isinstance(ann, types.UnionType) and type(None) in args:
            inner = [a for a in args if a is not type(None)]
            if inner == [bool]:  # --flag / --no-flag; neither keeps the field's None default
                kw["action"] = argparse.BooleanOptionalAction
            elif len(inner) != 1 or inner[0] not in (int, float, str):
                continue
            else:
                kw["type"] = inner[0]
        else:
            continue  # lists / nested models: set them in pipeline.yaml
        parser.add_argument(opt, **kw)


def _section(model: type, ns: argparse.Namespace) -> Any:
    """Build a section from the options the user gave (the rest keep their defaults)."""
    values = {n: getattr(ns, n) for n in model.model_fields if getattr(ns, n, None) is not None}
    return model(**values)


def _store(ns: argparse.Namespace) -> Any:
    from storage import ArtifactStore

    return ArtifactStore(ns.store or None)


# ---- stage commands -------------------------------------------------------------------------
def _cmd_import_target(ns: argparse.Namespace) -> str:
    from eagle_core.import_target import ImportTargetConfig, import_target

    cfg = ImportTargetConfig(gguf=ns.gguf, dtype=ns.dtype)
    return import_target(_store(ns), cfg, force=ns.force).url


def _cmd_build_demo_target(ns: argparse.Namespace) -> str:
    from eagle_core.demo import build_demo_target
    from flows.params import demo_target_config

    return build_demo_target(_store(ns), demo_target_config(ns.quick), force=ns.force).url


def _cmd_download(ns: argparse.Namespace) -> str:
    from eagle_core.download import config_from_options, download

    cfg = config_from_options(
        ns.source,
        max_samples=ns.max_samples,
        seed=ns.seed,
        kind=ns.kind,
        split=ns.split,
        config=ns.config,
        revision=ns.revision,
        shuffle=ns.shuffle,
        fim_split=ns.fim_split,
        max_reject_fraction=ns.max_reject_fraction,
    )
    return download(_store(ns), cfg, force=ns.force).url


def _ref(url: str, stage: str | tuple[str, ...]) -> Any:
    from storage import ArtifactError, ArtifactStore

    stages = (stage,) if isinstance(stage, str) else stage
    store, got, key = ArtifactStore.for_url(url)
    if got not in stages:
        raise ArtifactError(
            f"{url} is a {got!r} artifact, expected {' or '.join(map(repr, stages))}",
            fix=f"pass the URL of a {' or '.join(stages)} artifact: <root>/{stages[0]}/<key>",
        )
    return store.ref(got, key)


def _fim_tokens_option(value: str | None) -> tuple[str, str, str, str] | None:
    """`--fim-tokens`: a family of eagle_core.fim.FIM_FAMILIES, or 4 comma-separated token
    strings (prefix,suffix,middle,end)."""
    from eagle_core.errors import ConfigError
    from eagle_core.fim import FIM_FAMILIES

    if value is None:
        return None
    families: dict[str, tuple[str, str, str, str]] = {}
    for family, p, s, m, ends in FIM_FAMILIES:
        families.setdefault(family, (p, s, m, ends[0]))  # the first spelling of a family
    if value.lower() in families:
        return families[value.lower()]
    parts = tuple(t.strip() for t in value.split(","))
    if len(parts) != 4 or not all(parts):
        raise ConfigError(
            f"--fim-tokens={value!r} is neither a FIM family nor 4 token strings",
            fix=f"use one of {sorted(families)}, or prefix,suffix,middle,end token strings "
            "of the tokenizer (e.g. '<fim_prefix>,<fim_suffix>,<fim_middle>,<|endoftext|>')",
        )
    return parts  # type: ignore[return-value]


def _chat_template_option(value: str | None) -> str | None:
    """`--chat-template`: a template file is read here, so the artifact's key hashes the
    template's text (a path alone would not change when the file does); anything else (a
    template name of the tokenizer, or template text) passes through."""
    from eagle_core.errors import ConfigError

    if value is None:
        return None
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"--chat-template {value}: cannot be read ({exc})",
                fix="pass a readable UTF-8 .jinja file, a template name of the tokenizer, "
                "or the template text",
            ) from exc
        if not text.strip():
            raise ConfigError(
                f"--chat-template {value} is empty", fix="pass a non-empty Jinja chat template"
            )
        return text
    if value.endswith((".jinja", ".j2", ".jinja2")):
        raise ConfigError(
            f"--chat-template {value}: no such file",
            fix="check the path of the .jinja file (or pass a template name of the tokenizer)",
        )
    return value


def _cmd_tokenize(ns: argparse.Namespace) -> str:
    import dataclasses

    from eagle_core.errors import ConfigError
    from eagle_core.tokenize import tokenize
    from flows.params import TokenizeParams

    cfg = _section(TokenizeParams, ns).tokenize_config(ns.tokenizer, ns.format, ns.seed)
    extra: dict[str, Any] = {
        "chat_template": _chat_template_option(ns.chat_template),
        "chat_mask": ns.chat_mask,
        "last_turn_only": ns.last_turn_only or None,
        "fim_tokens": _fim_tokens_option(ns.fim_tokens),
    }
    # replace() re-runs the config's own checks
    cfg = dataclasses.replace(cfg, **{k: v for k, v in extra.items() if v is not None})
    if ns.num_proc < 1:
        raise ConfigError(
            f"--num-proc={ns.num_proc} must be >= 1", fix="use 1 (default) or the CPU count"
        )
    records = _ref(ns.records, ("download", "regenerate"))  # regenerate keeps the record schema
    return tokenize(_store(ns), records, cfg, force=ns.force, num_proc=ns.num_proc).url


def _cmd_regenerate(ns: argparse.Namespace) -> str:
    from eagle_core.regenerate import regenerate
    from flows.params import RegenerateParams

    cfg = _section(RegenerateParams, ns).regenerate_config(
        target=ns.target, tokenizer=ns.tokenizer, fim_order=ns.fim_order, seed=ns.seed
    )
    return regenerate(
        _store(ns),
        _ref(ns.records, "download"),
        cfg,
        force=ns.force,
        progress=_bar("regenerate"),
    ).url


def _cmd_scan_vocab(ns: argparse.Namespace) -> str:
    from eagle_core.vocab import scan_vocab
    from flows.params import VocabParams

    cfg = _section(VocabParams, ns).vocab_config()  # parameters are checked first
    if ns.target_vocab_size is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, target_vocab_size=ns.target_vocab_size)  # checked
    tokens = [_ref(u, "tokenize") for u in ns.tokens]
    return scan_vocab(_store(ns), tokens, cfg, force=ns.force).url


def _cmd_extract(ns: argparse.Namespace) -> str:
    from eagle_core.extract import extract_hidden
    from flows.params import ExtractParams

    cfg = _section(ExtractParams, ns).extract_config(ns.target)
    return extract_hidden(
        _store(ns),
        _ref(ns.tokens, "tokenize"),
        cfg,
        force=ns.force,
        progress=_bar("extract_hidden"),
    ).url


def _cmd_train(ns: argparse.Namespace) -> str:
    from eagle_core.launch import launch_training
    from flows.params import TrainParams

    p = _section(TrainParams, ns)
    cfg = p.train_config(
        store_url=_store(ns).root, target=ns.target, data=ns.data, vocab_map=ns.vocab_map
    )
    return launch_training(cfg, nproc=p.nproc, launcher=p.launcher, force=ns.force).url


def _cmd_export(ns: argparse.Namespace) -> str:
    from eagle_core.export import export
    from flows.params import ExportParams

    train_ref = _ref(ns.train, "train")
    kind = _store(ns).manifest("train", train_ref.key).meta.get("kind", "eagle3")
    cfg = _section(ExportParams, ns).export_config(kind, ns.target or "")
    return export(_store(ns), train_ref, cfg, force=ns.force).url


def _cmd_evaluate(ns: argparse.Namespace) -> str:
    from eagle_core.evaluate import evaluate
    from flows.params import EvalParams

    cfg = _section(EvalParams, ns).eval_config(
        target=ns.target, tokenizer=ns.tokenizer or ns.target, prompts=ns.prompts
    )
    ref = evaluate(_store(ns), _ref(ns.export, "export"), cfg, force=ns.force)
    from tasks.evaluate import tau_of

    print(f"acceptance length tau = {tau_of(ref)}", file=sys.stderr)
    return ref.url


def _bar(stage: str) -> Callable[[int, int], None]:
    """A stderr progress bar for a core `progress(done, total)` callback."""
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "b" not in bar:
            bar["b"] = tqdm(total=total, desc=stage, file=sys.stderr, disable=None)
        b = bar["b"]
        b.total = total
        b.update(done - b.n)
        if done >= total:
            b.close()

    return update


# ---- releases -------------------------------------------------------------------------------
def _release_lines(entry: dict[str, Any]) -> list[str]:
    """One entry of a release's history, for people (the export URL is printed last)."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    cmp = entry.get("compared_with") or {}
    acc = ", ".join(fmt(a) for a in entry.get("per_position_acceptance") or []) or "n/a"
    lines = [
        f"entry:      {entry.get('id')} ({entry.get('action')}, {entry.get('at')})",
        f"reason:     {entry.get('reason')}",
        f"tau:        {fmt(entry.get('tau'))}"
        + (f" (current release then: {fmt(cmp.get('tau'))})" if cmp else ""),
        f"acceptance: {acc} (per draft position)",
        f"lossless:   {entry.get('lossless')}",
        f"target:     {entry.get('target') or 'n/a'}",
        f"keys:       {entry.get('keys')}",
        f"flow run:   {entry.get('flow_run_id') or '-'}",
    ]
    fps = entry.get("fingerprints") or {}
    digest = lambda fp: fp.get("digest", "?") if isinstance(fp, dict) else "?"  # noqa: E731
    if fps.get("target"):
        lines.append(f"target fingerprint: {digest(fps['target'])}")
    for fp in fps.get("data") or []:
        where = fp.get("source") or fp.get("path") or "" if isinstance(fp, dict) else ""
        lines.append(f"data fingerprint:   {digest(fp)} {where}".rstrip())
    return lines


def _cmd_release_show(ns: argparse.Namespace) -> str:
    from eagle_core.release import show

    info = show(_store(ns), ns.name)
    current = info["current"]
    if current is None:
        from storage import ArtifactError

        raise ArtifactError(
            f"release {ns.name!r} has no promoted export yet ({info['pointer']})",
            fix="run the retrain flow (its first draft is promoted), or "
            f"`eagle-pipeline release promote {ns.name} --export URL`",
        )
    if info["stale"]:
        print(
            f"warning: {info['pointer']} lags the history (a promotion was interrupted); "
            "showing the history's newest promotion, which the next promotion writes there",
            file=sys.stderr,
        )
    print(f"release:    {ns.name} ({info['pointer']})")
    print("\n".join(_release_lines(current)))
    return current["export_url"]


def _cmd_release_history(ns: argparse.Namespace) -> str:
    from eagle_core.release import history, show

    store = _store(ns)
    entries = history(store, ns.name)
    for e in entries:
        tau = "n/a" if e.get("tau") is None else f"{e['tau']:.3f}"
        mark = "*" if e.get("promoted") else "-"
        print(f"{e.get('at')} {mark} {e.get('action'):8s} tau {tau:>6s} {e.get('export_url')}")
        print(f"    {e.get('reason')}")
    current = show(store, ns.name)["current"]
    print(f"{len(entries)} entries (* promoted, - not); current export:", file=sys.stderr)
    return current["export_url"] if current else ""


def _cmd_release_promote(ns: argparse.Namespace) -> str:
    from eagle_core.release import promote

    entry = promote(_store(ns), ns.name, ns.export, reason=ns.reason or "")
    print("\n".join(_release_lines(entry)), file=sys.stderr)
    return entry["export_url"]


# ---- whole pipeline -------------------------------------------------------------------------
def _run_flow(params: Any) -> str:
    from flows.retrain import retrain

    kwargs = {name: getattr(params, name) for name in type(params).model_fields}
    result = retrain(**kwargs)
    for stage, cached in result["cached"].items():
        print(f"{stage:18s} {'cached' if cached else 'computed'}", file=sys.stderr)
    print(f"exported draft: {result['export_url']}", file=sys.stderr)
    if result.get("release"):
        r = result["release"]
        print(f"release {r['name']}: {r['reason']}; serving {r['export_url']}", file=sys.stderr)
    print(f"acceptance length tau = {result['tau']}")
    return result["export_url"]


def _cmd_run(ns: argparse.Namespace) -> str:
    from flows.params import PipelineParams, load_pipeline_yaml

    params = load_pipeline_yaml(ns.config) if ns.config else PipelineParams()
    update: dict[str, Any] = {}
    if ns.store:
        update["storage"] = params.storage.model_copy(update={"root": ns.store})
    if ns.quick:
        update["quick"] = True
    if ns.force:
        update["force"] = sorted(set(params.force) | set(ns.force))
    if ns.release is not None or ns.release_enabled is not None:
        release: dict[str, Any] = {}
        if ns.release is not None:
            release["name"] = ns.release
        if ns.release_enabled is not None:
            release["enabled"] = ns.release_enabled
        update["release"] = params.release.model_copy(update=release)
    return _run_flow(
        PipelineParams.model_validate(
            {
                **params.model_dump(),
                **{
                    k: (v.model_dump() if hasattr(v, "model_dump") else v)
                    for k, v in update.items()
                },
            }
        )
    )


def _cmd_demo(ns: argparse.Namespace) -> str:
    from flows.params import demo_params

    return _run_flow(demo_params(quick=ns.quick, store=ns.store or "", force=ns.force))


def _cmd_ui(ns: argparse.Namespace) -> str:
    from flows.ui import serve_ui

    return serve_ui(port=ns.port, store=ns.store or "", open_browser=False)


# ---- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from flows.params import (
        STAGES,
        EvalParams,
        ExportParams,
        ExtractParams,
        RegenerateParams,
        TokenizeParams,
        TrainParams,
        VocabParams,
    )

    ap = argparse.ArgumentParser(
        prog="eagle-pipeline",
        description="Train EAGLE-3 / EAGLE-1 draft models: stages, the whole DAG, the UI. "
        "The last stdout line is the URL of the artifact produced.",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")

    def stage(
        name: str, help_: str, fn: Callable[[argparse.Namespace], str]
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument(
            "--store",
            default="",
            help="artifact root: local path or s3://bucket/prefix "
            "(default: $EAGLE_PIPELINE_STORE or ./artifacts)",
        )
        p.add_argument("--force", action="store_true", help="recompute even if cached")
        p.set_defaults(fn=fn)
        return p

    p = stage(
        "build-demo-target",
        "build the offline demo target (tokenizer, tiny Llama, demo data files)",
        _cmd_build_demo_target,
    )
    p.add_argument("--quick", action="store_true", help="a tiny target in seconds (tests)")

    p = stage(
        "import-target",
        "dequantize a GGUF file into a HF model dir (its artifact URL is a --target)",
        _cmd_import_target,
    )
    p.add_argument("--gguf", required=True, help="local .gguf file")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])

    p = stage("download", "read, validate and normalize datasets into records", _cmd_download)
    p.add_argument(
        "--source",
        action="append",
        required=True,
        help="path/glob/Hub name, optionally `:weight`, or a JSON object; repeatable",
    )
    p.add_argument("--kind", default="auto", choices=["chat", "fim", "tokens", "auto"])
    p.add_argument(
        "--split", default="train", help="Hub / dataset-dir split (ignored for plain files)"
    )
    p.add_argument(
        "--config",
        default=None,
        help="Hub dataset config name (`name=` of load_dataset); like --kind, --split and "
        "--revision it applies to the sources given as plain strings, not JSON ones",
    )
    p.add_argument(
        "--revision", default=None, help="Hub dataset revision: branch, tag or commit (pin it)"
    )
    p.add_argument(
        "--fim-split",
        default="lines",
        choices=["chars", "lines", "ast"],
        help="whole code files: the middle is random chars, whole lines, or an AST node",
    )
    p.add_argument(
        "--no-shuffle",
        dest="shuffle",
        action="store_false",
        help="keep file order (records stream to shards; the cap takes the first rows)",
    )
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-reject-fraction", type=float, default=0.1)

    p = stage("tokenize", "render and tokenize records with loss masks", _cmd_tokenize)
    p.add_argument("--records", required=True, help="download artifact URL")
    p.add_argument("--tokenizer", required=True, help="tokenizer dir, Hub name or artifact URL")
    p.add_argument("--format", default="chat", choices=["chat", "fim", "tokens", "auto"])
    p.add_argument("--seed", type=int, default=0)
    _add_section_options(p, TokenizeParams)
    p.add_argument(
        "--no-reasoning",
        dest="keep_reasoning",
        action="store_const",
        const=False,
        help="drop the reasoning of answers (same as --no-keep-reasoning)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="chat template: a .jinja file, a template name of the tokenizer, or the text "
        "(default: the tokenizer's own)",
    )
    p.add_argument(
        "--chat-mask",
        default=None,
        choices=["auto", "offsets", "generation"],
        help="how assistant tokens are found: {%% generation %%} marks, character offsets, "
        "or auto (marks when the template has them)",
    )
    p.add_argument(
        "--last-turn-only",
        action="store_true",
        help="train only on the last answer of each chat (e.g. regenerated data)",
    )
    p.add_argument(
        "--fim-tokens",
        default=None,
        help="FIM tokens: a family (starcoder, qwen, codellama, deepseek) or "
        "prefix,suffix,middle,end token strings (default: found in the tokenizer)",
    )
    p.add_argument("--num-proc", type=int, default=1, help="worker processes (not part of the key)")

    p = stage(
        "regenerate",
        "the target rewrites answers / FIM middles (local transformers or an OpenAI-compatible "
        "server; the API key is read from the env variable --api-key-env names)",
        _cmd_regenerate,
    )
    p.add_argument("--records", required=True, help="download artifact URL")
    p.add_argument("--target", required=True, help="target model dir, Hub name or artifact URL")
    p.add_argument("--tokenizer", default="", help="tokenizer (default: the target's)")
    p.add_argument("--fim-order", default="psm", choices=["psm", "spm"])
    p.add_argument("--seed", type=int, default=0)
    _add_section_options(p, RegenerateParams, skip=("enabled",))

    p = stage("scan-vocab", "choose the draft vocabulary", _cmd_scan_vocab)
    p.add_argument(
        "--tokens", action="append", required=True, help="tokenize artifact URL (repeatable)"
    )
    _add_section_options(p, VocabParams)
    p.add_argument(
        "--target-vocab-size",
        type=int,
        default=None,
        help="the target's config.vocab_size when its embedding is padded past the "
        "tokenizer (default: the tokenizer's size)",
    )

    p = stage("extract", "store target hidden states (offline training)", _cmd_extract)
    p.add_argument("--tokens", required=True, help="tokenize artifact URL")
    p.add_argument("--target", required=True, help="target model dir, Hub name or artifact URL")
    _add_section_options(p, ExtractParams)

    p = stage("train", "train the draft model", _cmd_train)
    p.add_argument(
        "--data",
        action="append",
        required=True,
        help="extract_hidden (offline) or tokenize (online) artifact URL; repeatable",
    )
    p.add_argument("--vocab-map", default=None, help="scan_vocab artifact URL (eagle3)")
    p.add_argument("--target", required=True, help="target model")
    _add_section_options(p, TrainParams)

    p = stage("export", "write the serving checkpoint", _cmd_export)
    p.add_argument("--train", required=True, help="train artifact URL")
    p.add_argument("--target", default="", help="target model (default: the training run's)")
    _add_section_options(p, ExportParams)

    p = stage("evaluate", "speculative decoding: acceptance length", _cmd_evaluate)
    p.add_argument("--export", required=True, help="export artifact URL")
    p.add_argument("--target", required=True, help="target model")
    p.add_argument("--tokenizer", default="", help="tokenizer (default: the target's)")
    p.add_argument(
        "--prompts",
        action="append",
        required=True,
        help="held-out prompt file (jsonl) or records artifact URL; repeatable",
    )
    _add_section_options(p, EvalParams)

    p = sub.add_parser(
        "release",
        help="the export a serving job should use: show, history, promote (rollback)",
        description="Releases live under <root>/releases/<name>/: current.json (the export "
        "to serve) and history/ (every decision). The last stdout line is the current "
        "export URL.",
    )
    rsub = p.add_subparsers(dest="release_command", required=True, metavar="action")
    for name, help_, fn in (
        ("show", "the current release (its export URL last)", _cmd_release_show),
        (
            "history",
            "every decision, oldest first (the current export URL last)",
            _cmd_release_history,
        ),
        ("promote", "make an export the current release by hand (rollback)", _cmd_release_promote),
    ):
        rp = rsub.add_parser(name, help=help_, description=help_)
        rp.add_argument("name", help="release name (the run form's release.name)")
        rp.add_argument(
            "--store", default="", help="artifact root (default: $EAGLE_PIPELINE_STORE)"
        )
        rp.set_defaults(fn=fn)
        if name == "promote":
            rp.add_argument("--export", required=True, help="export artifact URL to serve")
            rp.add_argument("--reason", default="", help="recorded in the history entry")

    p = sub.add_parser("run", help="run the retrain flow (the whole DAG)")
    p.add_argument("--config", default="", help="pipeline.yaml (sections of flows.params)")
    p.add_argument("--store", default="", help="artifact root (overrides the config's)")
    p.add_argument("--quick", action="store_true", help="quick preset")
    p.add_argument("--force", action="append", choices=list(STAGES), help="recompute a stage")
    p.add_argument("--release", default=None, help="release name (overrides the config's)")
    p.add_argument(
        "--release-stage",
        dest="release_enabled",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare with the current release and promote only a draft as good "
        "(default: the config's release.enabled, on)",
    )
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("demo", help="the whole DAG on the offline demo target and its data")
    p.add_argument("--quick", action="store_true", help="a few steps everywhere (<= 5 min)")
    p.add_argument("--store", default="", help="artifact root")
    p.add_argument("--force", action="append", choices=list(STAGES), help="recompute a stage")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("ui", help="start a local Prefect server + the retrain deployment")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--store", default="", help="default artifact root of the run form")
    p.set_defaults(fn=_cmd_ui)
    return ap


def _is_io_trouble(exc: BaseException) -> bool:
    """Network / object-store / filesystem trouble (not a bug, not a PipelineError)."""
    if isinstance(exc, OSError):  # ConnectionError and TimeoutError included
        return True
    return type(exc).__module__.split(".")[0] in _IO_ERROR_MODULES


def _secrets_of(ns: argparse.Namespace) -> list[str]:
    """Credentials inside any URL the user passed (`--store s3://KEY:SECRET@...`,
    `--source https://h/x?token=...`): never printed, whatever shape a message gives them."""
    from storage.urls import url_secrets

    found: list[str] = []
    for value in vars(ns).values():
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, str) and "://" in v:
                found += url_secrets(v)
    return found


def _print_err(text: str, secrets: Sequence[str]) -> None:
    from storage.urls import redact_text

    print(redact_text(text, secrets), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    _set_env_defaults()
    ns = build_parser().parse_args(argv)
    from storage.urls import install_log_redaction, redact_text, redact_url

    secrets = _secrets_of(ns)
    # every log record of this process: URLs redacted, and these literals masked
    install_log_redaction(secrets)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # -v is for our loggers: the S3/HTTP clients' DEBUG lines print signed request headers
    # (x-amz-security-token = the session token), which must never reach a log
    for name in _QUIET_WHEN_VERBOSE:
        logging.getLogger(name).setLevel(logging.INFO)
    # one INFO line per Prefect API call (progress artifacts update every few seconds) would
    # bury the stage logs
    logging.getLogger("httpx").setLevel(logging.INFO if ns.verbose else logging.WARNING)
    from pydantic import ValidationError

    from storage.errors import PipelineError

    try:
        url = ns.fn(ns)
    except PipelineError as exc:
        _print_err(f"eagle-pipeline {ns.command}: {exc}", secrets)
        return 2
    except ValidationError as exc:
        # field + message only: pydantic's own text repeats the input, which may be a secret
        lines = [
            f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        ]
        _print_err(
            f"eagle-pipeline {ns.command}: invalid parameters:\n" + "\n".join(lines), secrets
        )
        return 2
    except Exception as exc:
        if not _is_io_trouble(exc):
            if not secrets:
                raise
            # a bug, but its traceback could quote a credential of a URL argument: print it
            # redacted instead of letting the interpreter print it raw
            import traceback

            _print_err("".join(traceback.format_exception(exc)).rstrip(), secrets)
            return 1
        # transient storage/network trouble (the tasks retry it; here the user reruns)
        _print_err(
            f"eagle-pipeline {ns.command}: storage or network error: {type(exc).__name__}: "
            f"{exc}. Fix: check that the artifact root / S3 endpoint is reachable, then rerun "
            "(the failed stage published nothing; its finished shards are reused)",
            secrets,
        )
        return 3
    shown = redact_text(redact_url(url), secrets)
    if shown != url:
        print(
            "eagle-pipeline: the artifact URL below has its credentials masked (***); give "
            "them to the next command through the environment, not in the URL",
            file=sys.stderr,
        )
    print(shown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
