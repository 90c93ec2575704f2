"""The Prefect UI as a user sees it, in a real browser against a real Prefect server.

`eagle-pipeline ui` runs in a subprocess (its own process group, PREFECT_HOME and database,
so nothing is shared with the in-process Prefect harness of tests/flows). Debian's headless
`chromium`, driven by Playwright's Python API:

1. opens the `retrain` deployment's custom-run form: every stage section in DAG order, every
   field's description, closed choices as selects, booleans as switches, no secret field;
2. enters out-of-range values (draft vocab size 0, 17 TTT steps): the form refuses them and
   no flow run is created;
3. turns the quick preset on, points the artifact root at a fresh directory and submits;
4. waits for the served deployment to finish that run, then opens the run's Artifacts tab and
   finds the evaluation (tau) and the training-curve image.

Screenshots of the form and the finished run go to benchmarks/results/ui/ (the README shows
them). When the browser cannot start the tests FAIL: CI must not pass without having looked.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from flows.params import PipelineParams

REPO = Path(__file__).resolve().parents[2]
UI_START_TIMEOUT_S = 360.0  # server (its own limit: 240 s) + three deployments, loaded machine
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = REPO / "benchmarks" / "results" / "ui"  # screenshots the README shows


@dataclass
class UIServer:
    """A running `eagle-pipeline ui`: the run form's URL and the API behind it."""

    form_url: str  # http://127.0.0.1:P/deployments/deployment/<id>/run
    base_url: str  # http://127.0.0.1:P
    api_url: str  # http://127.0.0.1:P/api
    deployment_id: str
    log_path: Path  # the command's stderr (server start, serve, flow-run logs)

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _eagle_pipeline() -> list[str]:
    """The installed console script next to this interpreter (`.venv/bin/eagle-pipeline`)."""
    script = Path(sys.executable).parent / "eagle-pipeline"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]


def _clean_env(prefect_home: Path) -> dict[str, str]:
    """This process's environment without any PREFECT_* setting (the session harness of
    tests/flows may have pointed PREFECT_API_URL at its own server), plus a private home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("EAGLE_PIPELINE_STORE", None)
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C `eagle-pipeline ui` (serve returns, then it stops its server), then SIGTERM and
    SIGKILL to its whole process group; finally nothing of that group is left running."""
    steps = ((signal.SIGINT, False, 30), (signal.SIGTERM, True, 30), (signal.SIGKILL, True, 10))
    for sig, group, wait_s in steps:
        if proc.poll() is not None:
            break
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            proc.wait(timeout=wait_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue
    try:  # stragglers of the group (a flow-run process, a server that outlived its parent)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _child_setup() -> None:
    """A background shell starts jobs with SIGINT ignored; Ctrl-C must reach `serve`."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIServer]:
    """`eagle-pipeline ui --port P --store <tmp>` for the tests of this module."""
    tmp = tmp_path_factory.mktemp("ui")
    port = _free_port()
    log_path = tmp / "eagle-pipeline-ui.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*_eagle_pipeline(), "ui", "--port", str(port), "--store", str(tmp / "default-root")],
            cwd=REPO,
            env=_clean_env(tmp / "prefect-home"),
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # its own process group: teardown stops server + runs
            preexec_fn=_child_setup,
        )
    try:
        form_url = _read_url(proc, log_path)
        base = f"http://127.0.0.1:{port}"
        assert form_url.startswith(f"{base}/deployments/deployment/"), form_url
        assert form_url.endswith("/run"), form_url
        assert httpx.get(f"{base}/api/health", timeout=10).status_code == 200
        # the pages call the API the server tells them: it must be this server, not :4200
        ui_api = httpx.get(f"{base}/ui-settings", timeout=10).json().get("api_url")
        assert ui_api == f"{base}/api", f"the UI pages would call {ui_api}, not {base}/api"
        yield UIServer(
            form_url=form_url,
            base_url=base,
            api_url=f"{base}/api",
            deployment_id=form_url.rstrip("/").split("/")[-2],
            log_path=log_path,
        )
    finally:
        _stop(proc)
        assert proc.poll() is not None, "eagle-pipeline ui did not stop on Ctrl-C/SIGTERM/KILL"


def _read_url(proc: subprocess.Popen[bytes], log_path: Path) -> str:
    """The first stdout line of `eagle-pipeline ui` is the run form's URL."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + UI_START_TIMEOUT_S
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            status = "exited" if proc.poll() is not None else "printed no URL"
            pytest.fail(
                f"eagle-pipeline ui {status} after {UI_START_TIMEOUT_S - max(left, 0):.0f} s; "
                f"its stderr ends with:\n{tail}"
            )
        if sel.select(timeout=min(left, 1.0)):
            chunk = os.read(proc.stdout.fileno(), 4096)
            buf += chunk
    return buf.split(b"\n", 1)[0].decode().strip()


def chromium_path() -> str:
    """$EAGLE_PIPELINE_CHROMIUM, else Debian's `chromium` (.ci/ensure-chromium installs it)."""
    return (
        os.environ.get("EAGLE_PIPELINE_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
        or "/usr/bin/chromium"
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium. A browser that cannot start fails the test, it never skips it."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    pw = sync_playwright().start()
    try:
        try:
            b = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        except Exception as e:  # noqa: BLE001 - any launch failure is reported the same way
            pytest.fail(
                f"headless Chromium could not start from {exe}: {e}\n"
                "fix: run .ci/ensure-chromium (apt-get install -y chromium) or point "
                "EAGLE_PIPELINE_CHROMIUM at a Chromium binary"
            )
        yield b
        b.close()
    finally:
        pw.stop()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    """A fresh tab, large enough that a form section fits in a screenshot."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})  # type: ignore[attr-defined]
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    ctx.close()


# ---- the form -------------------------------------------------------------------------------
SECTIONS = (
    "data",
    "regenerate",
    "tokenize",
    "vocab",
    "extract",
    "train",
    "export",
    "evaluate",
    "release",
    "storage",
)  # DAG order
RUN_TIMEOUT_S = 900.0  # the quick preset on the quick demo target takes ~2-4 min on 2 cores
pytestmark = pytest.mark.slow


def prop(scope: Any, label: str) -> Any:
    """The form property (label, description, input) whose own label is `label`, searched
    under `scope` (the page, or a section property for its nested fields)."""
    return scope.locator(
        "xpath=.//div[contains(concat(' ', normalize-space(@class), ' '),"
        " ' schema-form-property ')]"
        "[./div[contains(@class, 'p-label__header')]"
        "//span[contains(@class, 'schema-form-property__label')]"
        f"[normalize-space()='{label}' or starts-with(normalize-space(), '{label} (')]]"
    ).first


# What a section property shows: its own description, and for each field directly inside it
# the label, the description under it, whether it is rendered, and its kind of input.
DESCRIBE_FIELDS_JS = """
(section) => {
  const own = (el, sel) => [...el.querySelectorAll(sel)].find(
      (x) => x.closest('.schema-form-property') === el);
  const text = (el) => (el ? el.innerText.trim() : '');
  const fields = [...section.querySelectorAll('.schema-form-property')].filter(
      (el) => el !== section && el.parentElement.closest('.schema-form-property') === section);
  return {
    description: text(own(section, '.schema-form-property__description')),
    fields: fields.map((el) => ({
      label: text(own(el, '.schema-form-property__label')),
      description: text(own(el, '.schema-form-property__description')),
      visible: el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden',
      select: el.querySelector('.p-select') !== null,
      switch: el.querySelector('[role=switch]') !== null,
    })),
  };
}
"""


def run_name_input(page: Any) -> Any:
    return page.locator(
        "xpath=//div[contains(@class, 'p-label')]"
        "[./div[contains(@class, 'p-label__header')]//span[normalize-space()='Run Name']]//input"
    ).first


def screenshot(page: Any, name: str) -> None:
    """Save the viewport to benchmarks/results/ui/<name> as a small palette PNG (~3x smaller
    than the browser's; the README shows them)."""
    import io

    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    img = Image.open(io.BytesIO(page.screenshot())).convert("RGB").quantize(colors=128)
    img.save(SHOTS / name, optimize=True)


def scroll_to_top(page: Any, locator: Any) -> None:
    locator.evaluate("el => el.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)  # let the scroll settle before a screenshot


def open_form(page: Any, ui: UIServer) -> None:
    """Load the run form; one reload when it has not rendered (a cold UI bundle on a loaded
    machine), then fail with what the page shows."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(2):
        if attempt == 0:
            page.goto(ui.form_url, timeout=90_000)
        else:
            page.reload(timeout=90_000)
        try:
            prop(page, "storage").wait_for(timeout=60_000)  # rendered from the schema
            return
        except PlaywrightTimeout:
            continue
    shown = page.inner_text("body")[-2000:]
    pytest.fail(f"the run form {ui.form_url} did not render; the page shows:\n{shown}")


def section_model(name: str) -> type[BaseModel]:
    return PipelineParams.model_fields[name].annotation  # type: ignore[return-value]


def field_title(model: type[BaseModel], name: str) -> str:
    """The label the form shows: the JSON-schema title pydantic derives."""
    return str(model.model_json_schema()["properties"][name]["title"])


def is_choice(info: Any) -> bool:
    return typing.get_origin(info.annotation) is typing.Literal


def api_runs_named(ui: UIServer, name: str) -> list[dict[str, Any]]:
    r = httpx.post(
        f"{ui.api_url}/flow_runs/filter",
        json={"flow_runs": {"name": {"any_": [name]}}, "limit": 10},
        timeout=30,
    )
    r.raise_for_status()
    return list(r.json())


def submit(page: Any) -> None:
    page.get_by_role("button", name="Submit", exact=True).click()


def test_run_form_sections_descriptions_selects_and_limits(page: Any, ui_server: UIServer) -> None:
    from playwright.sync_api import expect

    open_form(page, ui_server)

    # 1. one section per stage, in DAG order, each with its description and every field's
    # one-line description under the field
    tops = []
    for name in SECTIONS:
        section = prop(page, name)
        expect(section).to_be_visible()
        tops.append(section.bounding_box()["y"])
        shown = section.evaluate(DESCRIBE_FIELDS_JS)
        assert shown["description"], f"section {name} shows no description"
        fields = {f["label"].removesuffix(" (Optional)"): f for f in shown["fields"]}
        model = section_model(name)
        for field, info in model.model_fields.items():
            where = f"{name}.{field}"
            assert info.description, f"{where} has no description"
            got = fields.get(field_title(model, field))
            assert got is not None, f"{where} missing from the form section: {sorted(fields)}"
            assert got["visible"], f"{where} is not visible"
            assert got["description"] == info.description, (where, got)
            if is_choice(info):  # closed choices (chat/fim, psm/spm, eagle3/eagle1, ZeRO)
                assert got["select"], f"{where} is a closed choice but not a select"
            elif info.annotation is bool:
                assert got["switch"], f"{where} is a boolean but not a switch"
        assert len(fields) == len(model.model_fields), sorted(fields)
    order = dict(zip(SECTIONS, tops, strict=True))
    assert tops == sorted(tops), f"sections out of DAG order (y on the page): {order}"
    expect(prop(page, "quick").locator("[role=switch]")).to_have_attribute("aria-checked", "false")
    expect(page.locator("input[type=password]")).to_have_count(0)  # no secret in the form

    # a select offers exactly the closed choices (a Prefect select opens on focus + Space)
    kind = prop(prop(page, "train"), "Draft Kind").locator("button.p-select-button__control")
    expect(kind).to_have_text("eagle3")
    kind.focus()
    page.keyboard.press("Space")
    expect(page.get_by_role("option")).to_have_text(["eagle3", "eagle1"])
    page.keyboard.press("Escape")

    # 2. limits are the form's own: out-of-range values are refused and no run is created
    name = f"ui-invalid-{uuid.uuid4().hex[:8]}"
    run_name_input(page).fill(name)
    vocab_size = prop(prop(page, "vocab"), "Draft Vocab Size").locator("input")
    expect(vocab_size).to_have_value(str(PipelineParams().vocab.draft_vocab_size))
    vocab_size.fill("0")
    submit(page)
    expect(
        page.get_by_text(
            "Validation failed for field 'vocab.draft_vocab_size'. "
            "Failure reason: 0 is less than the minimum of 1"
        ).first
    ).to_be_visible()
    expect(page).to_have_url(ui_server.form_url)  # still on the form
    vocab_size.fill("256")
    ttt = prop(prop(page, "train"), "Ttt Steps").locator("input")
    ttt.fill("17")
    submit(page)
    expect(page.get_by_text("Validation failed for field 'train.ttt_steps'").first).to_be_visible()
    expect(page.get_by_text("17 is greater than the maximum of 16").first).to_be_visible()
    expect(page).to_have_url(ui_server.form_url)
    assert api_runs_named(ui_server, name) == [], "the server accepted a refused form"


# ---- a quick run from the form --------------------------------------------------------------
def wait_for_run(ui: UIServer, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    """Poll the API until the flow run is final; fail with its logs unless COMPLETED."""
    deadline = time.monotonic() + timeout_s
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = httpx.get(f"{ui.api_url}/flow_runs/{run_id}", timeout=30).json()
        if run.get("state_type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(3)
    if run.get("state_type") != "COMPLETED":
        logs = "\n".join(m for _, m in run_logs(ui, run_id)[-40:])
        pytest.fail(
            f"flow run {run_id} is {run.get('state_type')} ({run.get('state_name')}) after "
            f"{timeout_s:.0f} s at most.\nflow-run logs:\n{logs}\n"
            f"eagle-pipeline ui stderr:\n{ui.log_tail()}"
        )
    return run


def run_logs(ui: UIServer, run_id: str) -> list[tuple[str, str]]:
    """(timestamp, message) of every log line of the flow run and its tasks."""
    out: list[tuple[str, str]] = []
    offset = 0
    while True:
        r = httpx.post(
            f"{ui.api_url}/logs/filter",
            json={
                "logs": {"flow_run_id": {"any_": [run_id]}},
                "sort": "TIMESTAMP_ASC",
                "limit": 200,
                "offset": offset,
            },
            timeout=30,
        )
        r.raise_for_status()
        batch = r.json()
        out.extend((row["timestamp"], row["message"]) for row in batch)
        if len(batch) < 200:
            return out
        offset += len(batch)


def wait_for_log(
    ui: UIServer, run_id: str, wanted: Callable[[str], bool], timeout_s: float = 60
) -> list[str]:
    """The run's log messages once one satisfies `wanted`.

    Prefect ships log lines from the flow's process in batches, so the last stage's lines can
    reach the API after the run is already COMPLETED.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        messages = [m for _, m in run_logs(ui, run_id)]
        if any(wanted(m) for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(1)


def test_quick_run_submitted_from_the_form(page: Any, ui_server: UIServer, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    # 3. the quick preset on a fresh artifact root, from the form
    root = tmp_path / "artifacts"
    name = f"ui-quick-{uuid.uuid4().hex[:8]}"
    open_form(page, ui_server)
    run_name_input(page).fill(name)
    quick = prop(page, "quick").locator("[role=switch]")
    quick.click()
    expect(quick).to_have_attribute("aria-checked", "true")
    root_input = prop(prop(page, "storage"), "Root").locator("textarea")
    root_input.fill(str(root))
    scroll_to_top(page, prop(page, "train"))  # the README's picture of the form
    screenshot(page, "form.png")
    scroll_to_top(page, prop(page, "quick"))
    screenshot(page, "form-quick.png")
    submit(page)
    expect(page).to_have_url(re.compile(r"\?tab=Runs"), timeout=60_000)

    runs = api_runs_named(ui_server, name)
    assert len(runs) == 1, runs
    run_id = runs[0]["id"]
    params = runs[0]["parameters"]
    assert params["quick"] is True and params["storage"]["root"] == str(root), params

    # 4. the served deployment runs it to completion
    wait_for_run(ui_server, run_id)
    result_logs = wait_for_log(
        ui_server, run_id, lambda m: m.startswith("evaluate ") and ": computed in" in m
    )
    for stage in ("download", "tokenize", "scan_vocab", "extract_hidden", "train", "export"):
        assert any(m.startswith(f"{stage} ") and ": computed in" in m for m in result_logs), (
            f"no 'computed' line for {stage} on a fresh root"
        )
    assert any(m.startswith("evaluate ") and ": computed in" in m for m in result_logs)
    assert (root / "evaluate").is_dir() and (root / "export").is_dir()

    arts = httpx.post(
        f"{ui_server.api_url}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [run_id]}}},
        timeout=30,
    ).json()
    by_key = {a["key"]: a for a in arts if a.get("key")}
    shown = {  # what a run shows of its work (issue: reject table ... link to the draft)
        "download-counts",  # rows kept and rejected by reason
        "scan-vocab-coverage",
        "train-curves",  # the loss image
        "train-step-accuracy",
        "evaluate-summary",  # tau, speedup, losslessness
        "evaluate-acceptance",  # per position
        "evaluate-report",
        "export-link",
    }
    assert shown <= set(by_key), f"missing artifacts: {sorted(shown - set(by_key))}"
    progress = sorted(a["key"] for a in arts if a.get("type") == "progress")
    assert "extract-hidden-progress" in progress, f"progress artifacts: {progress}"
    tau = re.search(r"tau = ([0-9.]+)", by_key["evaluate-summary"]["description"] or "")
    assert tau and float(tau.group(1)) >= 1.0, by_key["evaluate-summary"]["description"]

    # ... and its page shows the evaluation (tau) and the training-curve image
    page.goto(f"{ui_server.base_url}/runs/flow-run/{run_id}")
    expect(page.get_by_text(name).first).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
    open_artifacts_tab(page)
    report = page.locator(".artifact-card", has_text="evaluate-report")
    expect(report).to_be_visible()
    expect(report).to_contain_text(f"tau = {tau.group(1)}")
    expect(page.locator(".artifact-card", has_text="evaluate-summary")).to_be_visible()
    expect(page.locator(".artifact-card", has_text="train-curves")).to_be_visible()
    screenshot(page, "run.png")

    page.locator(".artifact-card", has_text="evaluate-summary").click()  # the evaluation table
    expect(page).to_have_url(re.compile(r"/artifacts/artifact/"))
    tau_row = page.locator("tr").filter(has=page.locator("td", has_text=re.compile(r"^tau$")))
    expect(tau_row).to_be_visible()
    # the table renders the number its own way (1.0 shows as "1"): compare values
    cells = tau_row.first.locator("td").all_inner_texts()
    assert any(
        re.fullmatch(r"-?\d+(\.\d+)?", c.strip()) and float(c) == float(tau.group(1)) for c in cells
    ), (cells, tau.group(1))
    screenshot(page, "run-evaluation.png")

    page.go_back()
    open_artifacts_tab(page)
    page.locator(".artifact-card", has_text="train-curves").click()
    curve = page.locator("img[alt='training loss']")
    expect(curve).to_be_visible()
    width = curve.evaluate("img => img.complete ? img.naturalWidth : 0")
    assert width > 100, f"the training-curve image did not render (naturalWidth {width})"
    screenshot(page, "run-curves.png")


def open_artifacts_tab(page: Any) -> None:
    """The run page's Artifacts tab (Prefect's tabs are list items, not ARIA tabs)."""
    from playwright.sync_api import expect

    page.locator("li.p-tab", has_text="Artifacts").click()
    expect(page.locator(".artifact-card").first).to_be_visible()
