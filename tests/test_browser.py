"""The shipped workflows in the real front-end: headless Chromium (Debian's package) on the real server.

The browser is driven over the DevTools protocol (aiohttp's websocket client, a ComfyUI dependency). Each
workflow is loaded through the UI (``app.loadGraphData``); the test asserts that no node type is missing,
that every pack node carries the pack's badge and colour, that the Windows node's plan widget has drawn the
plan the server computes, and that the Sampler's report widget shows the counts of an ``executed`` message.
Screenshots go to the test's folder, and to ``docs/screenshots/`` when they are new or changed visibly.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
VIEWPORT = (1600, 1000)
# Mean absolute difference (0-255) above which a screenshot counts as changed and replaces the docs' copy.
SCREENSHOT_CHANGE = 3.0

pytestmark = pytest.mark.graph


def _browser() -> str | None:
    explicit = os.environ.get("FLASHPORTRAIT_BROWSER")
    if explicit:
        return explicit
    return next((path for path in map(shutil.which, BROWSER_NAMES) if path), None)


class DevTools:
    """Minimal DevTools-protocol client for one page: send a command, wait for its answer."""

    def __init__(self, websocket):
        self.websocket = websocket
        self.next_id = 0
        self.console: list[str] = []

    async def send(self, method: str, timeout: float = 60.0, **params) -> dict:
        self.next_id += 1
        message_id = self.next_id
        await self.websocket.send_str(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = await self.websocket.receive_json(timeout=max(0.1, deadline - time.monotonic()))
            if message.get("method") == "Runtime.consoleAPICalled":
                args = message["params"]["args"]
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif message.get("method") == "Runtime.exceptionThrown":
                self.console.append(str(message["params"]["exceptionDetails"].get("exception", {})))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str, timeout: float = 60.0):
        result = await self.send("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                                 returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(f"page error: {details.get('exception', {}).get('description', details)}")
        return result["result"].get("value")

    async def screenshot(self) -> bytes:
        result = await self.send("Page.captureScreenshot", format="png")
        return base64.b64decode(result["data"])


# Runs in the page: load one workflow through the UI, bring the pack's main nodes into view and report what
# the front-end made of it.
LOAD_AND_INSPECT = """
(async (workflow, name) => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const reported = [];
  const original = app.showMissingNodesError;
  app.showMissingNodesError = (types) => { reported.push(...types); };
  try {
    await app.loadGraphData(workflow, true, true, name, {showMissingNodesDialog: false,
                                                         showMissingModelsDialog: false});
  } finally {
    app.showMissingNodesError = original;
  }
  const windowsNodes = app.graph.nodes.filter((n) => n.comfyClass === "FlashPortraitWindows");
  // The plan is fetched from the server after loading: wait for every plan widget to draw.
  for (let i = 0; i < 100; i++) {
    const drawn = windowsNodes.every((n) => n.widgets.find((w) => w.name === "window_plan")
                                            ?.element?.dataset?.drawn === "1");
    if (drawn) break;
    await sleep(100);
  }
  await window.flashportraitFit(["FlashPortraitWindows", "FlashPortraitSampler", "FlashPortraitEmotionConditioning"]);
  const nodes = app.graph.nodes.map((n) => {
    const badges = (n.badges ?? []).map((b) => (typeof b === "function" ? b() : b)).map((b) => b.text);
    const info = {id: n.id, type: n.type, registered: n.type in LiteGraph.registered_node_types,
                  comfyClass: n.comfyClass ?? null, color: n.color ?? null, badges};
    const plan = n.widgets?.find((w) => w.name === "window_plan");
    if (plan) {
      const canvas = plan.element.querySelector("canvas");
      const rect = canvas.getBoundingClientRect();
      const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      const colours = new Set();
      for (let p = 0; p < pixels.length; p += 4 * 7) colours.add(pixels[p] << 16 | pixels[p + 1] << 8 | pixels[p + 2]);
      info.plan = {dataset: {...plan.element.dataset}, caption: plan.element.innerText,
                   width: rect.width, height: rect.height, colours: colours.size,
                   window_length: n.widgets.find((w) => w.name === "window_length").value,
                   overlap: n.widgets.find((w) => w.name === "overlap").value,
                   preview_frames: n.properties.preview_frames};
    }
    const report = n.widgets?.find((w) => w.name === "alp_report");
    if (report) {
      const rect = report.element.getBoundingClientRect();
      info.report = {text: report.element.innerText, width: rect.width, height: rect.height};
    }
    return info;
  });
  return {nodes, reported};
})
"""

# Fits the view to the nodes of the given types (every node when none given), without animation.
FIT = """
window.flashportraitFit = async (types) => {
  // Muted optional branches (mode 2) stay out of the close-ups.
  const nodes = types?.length ? app.graph.nodes.filter((n) => types.includes(n.comfyClass) && n.mode === 0)
                              : app.graph.nodes;
  app.canvas.deselectAll?.();
  app.canvas.selectItems?.(nodes);
  app.canvas.fitViewToSelectionAnimated({duration: 1});
  await new Promise((r) => setTimeout(r, 600));
  app.canvas.deselectAll?.();
  app.graph.setDirtyCanvas(true, true);
  await new Promise((r) => setTimeout(r, 600));
};
"""

EXECUTED = """
(async (nodeId, output) => {
  const {api} = window.comfyAPI.api;
  api.dispatchCustomEvent("executed", {node: String(nodeId), display_node: String(nodeId), output,
                                       prompt_id: "browser-test"});
  await new Promise((r) => setTimeout(r, 400));
  const node = app.graph.getNodeById(nodeId);
  const element = node.widgets.find((w) => w.name === "alp_report").element;
  const windowsNode = node.getInputNode(node.findInputSlot("windows"));
  return {text: element.innerText, dataset: {...element.dataset},
          preview_frames: windowsNode?.properties?.preview_frames ?? null};
})
"""


# Runs in the page: settings the server would round or refuse, and the hints the pack shows for them.
HINTS = """
(async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const find = (type) => app.graph.nodes.find((n) => n.comfyClass === type && n.mode === 0);
  const widget = (node, name) => node.widgets.find((w) => w.name === name);
  const badges = (node) => node.badges.map((b) => (typeof b === "function" ? b() : b)).map((b) => b.text);
  const sampler = find("FlashPortraitSampler"), windows = find("FlashPortraitWindows");
  const before = {sampler: badges(sampler), windows: badges(windows)};
  widget(sampler, "max_side").value = 700;
  widget(windows, "overlap").value = 60;
  widget(windows, "overlap").callback?.(60);
  await sleep(800);
  const plan = widget(windows, "window_plan").element;
  const notices = [];
  const toast = app.extensionManager.toast;
  const add = toast.add;
  toast.add = (message) => { notices.push(message); };
  const queued = [];
  const {api} = window.comfyAPI.api;
  const queuePromptApi = api.queuePrompt;
  api.queuePrompt = async (...args) => { queued.push(args[0]); return {prompt_id: "browser-test", number: 0}; };
  try { await app.queuePrompt(0, 1); } finally { toast.add = add; api.queuePrompt = queuePromptApi; }
  const after = {sampler: badges(sampler), windows: badges(windows), caption: plan.innerText,
                 drawn: plan.dataset.drawn};
  widget(sampler, "max_side").value = 720;
  widget(windows, "overlap").value = 30;
  widget(windows, "overlap").callback?.(30);
  await sleep(500);
  return {before, after, notices: notices.map((n) => ({summary: n.summary, detail: n.detail})),
          queued: queued.length, restored: {sampler: badges(sampler), windows: badges(windows)}};
})()
"""


# What the front-end saves and queues for the pack's nodes: the preview widgets stay out of both.
SAVED = """
(async () => {
  const windows = app.graph.nodes.find((n) => n.comfyClass === "FlashPortraitWindows");
  const sampler = app.graph.nodes.find((n) => n.comfyClass === "FlashPortraitSampler");
  windows.flashportraitSetPreviewFrames(777);
  const saved = app.graph.serialize().nodes;
  const {output} = await app.graphToPrompt();
  const of = (node) => saved.find((n) => n.id === node.id);
  return {windows: {widgets_values: of(windows).widgets_values, properties: of(windows).properties,
                    inputs: output[String(windows.id)].inputs},
          sampler: {widgets_values: of(sampler).widgets_values, inputs: Object.keys(output[String(sampler.id)].inputs)}};
})()
"""

SOLVER_HINTS = """
(() => {
  const badges = (node) => node.badges.map((b) => (typeof b === "function" ? b() : b)).map((b) => b.text);
  const samplers = app.graph.nodes.filter((n) => n.comfyClass === "FlashPortraitSampler");
  const byTitle = Object.fromEntries(samplers.map((n) => [n.title, n]));
  const alp = samplers.find((n) => n.widgets.find((w) => w.name === "acceleration").value === "fast");
  const lora = samplers.find((n) => n.widgets.find((w) => w.name === "acceleration").value === "4-step LoRA");
  const result = {alp: badges(alp).at(-1), lora: badges(lora).at(-1)};
  const solver = alp.widgets.find((w) => w.name === "sampler");
  solver.value = "adams2";
  result.alp_adams2 = badges(alp).at(-1);
  solver.value = "euler";
  // The 4-step sampler fed straight from the model loader, without the LoRA:
  const loader = app.graph.nodes.find((n) => n.comfyClass === "FlashPortraitModelLoader");
  const linkId = lora.inputs[lora.findInputSlot("model")].link;
  const loraNode = lora.getInputNode(lora.findInputSlot("model"));
  loader.connect(0, lora, lora.findInputSlot("model"));
  result.lora_without_lora = badges(lora).at(-1);
  loraNode.connect(0, lora, lora.findInputSlot("model"));
  result.restored = badges(lora).at(-1);
  return result;
})()
"""


async def _open_page(browser: str, user_dir: str):
    import aiohttp

    process = subprocess.Popen(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--remote-debugging-port=0",
         f"--user-data-dir={user_dir}", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # The browser prints its DevTools address on stderr once it listens.
    port = None
    deadline = time.monotonic() + 60
    while port is None and time.monotonic() < deadline:
        line = await asyncio.to_thread(process.stderr.readline)
        if not line and process.poll() is not None:
            break
        match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if match:
            port = int(match.group(1))
    if port is None:
        process.kill()
        raise RuntimeError(f"{browser} did not start (exit code {process.poll()})")
    session = aiohttp.ClientSession()
    async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
        targets = await response.json()
    page = next(t for t in targets if t["type"] == "page")
    websocket = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
    return process, session, websocket


def _prepare_user_settings(server_url: str) -> None:
    """Settings of the server's (per-test-session) user: no first-start template browser over the graph, no
    minimap, and full detail at any zoom so the overview screenshots show text."""
    settings = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                "LiteGraph.Canvas.MinFontSizeForLOD": 0}
    request = urllib.request.Request(f"{server_url}/api/settings", data=json.dumps(settings).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).read()


def _save_screenshot(png: bytes, name: str, out_dir: Path) -> Path:
    """Writes the test's copy; replaces the docs' copy only when it is new or differs visibly."""
    (out_dir / name).write_bytes(png)
    docs_copy = SCREENSHOTS / name
    new = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    if docs_copy.is_file():
        old = np.asarray(Image.open(docs_copy).convert("RGB"), dtype=np.float32)
        if old.shape == new.shape and np.abs(old - new).mean() <= SCREENSHOT_CHANGE:
            return docs_copy
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    docs_copy.write_bytes(png)
    return docs_copy


async def _run_browser(server_url: str, workflows: list[Path], out_dir: Path, browser: str) -> dict:
    results = {}
    _prepare_user_settings(server_url)
    with tempfile.TemporaryDirectory(prefix="flashportrait-browser-") as user_dir:
        process, session, websocket = await _open_page(browser, user_dir)
        try:
            tools = DevTools(websocket)
            await tools.send("Page.enable")
            await tools.send("Runtime.enable")
            await tools.send("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                             deviceScaleFactor=1, mobile=False)
            await tools.send("Page.addScriptToEvaluateOnNewDocument",
                             source='localStorage.setItem("vueNodesBannerDismissed", "true")')
            await tools.send("Page.navigate", url=server_url)
            ready = await tools.evaluate("""(async () => {
                for (let i = 0; i < 600; i++) {
                  const app = window.comfyAPI?.app?.app;
                  if (app?.graph && app.extensions?.some((e) => e.name === "FlashPortrait.Interface")
                      && LiteGraph.registered_node_types["FlashPortraitSampler"]) { window.app = app; return true; }
                  await new Promise((r) => setTimeout(r, 100));
                }
                return false;
            })()""", timeout=90)
            assert ready, "the front-end did not load the pack's extension:\n" + "\n".join(tools.console[-20:])
            results["registered"] = await tools.evaluate(
                "Object.keys(LiteGraph.registered_node_types).filter((t) => t.startsWith('FlashPortrait'))")
            await tools.evaluate(FIT)
            for path in workflows:
                workflow = json.loads(path.read_text())
                inspected = await tools.evaluate(
                    f"{LOAD_AND_INSPECT}({json.dumps(workflow)}, {json.dumps(path.stem)})", timeout=90)
                png = await tools.screenshot()
                screenshot = _save_screenshot(png, path.stem + ".png", out_dir)
                results[path.name] = {"inspected": inspected, "screenshot": screenshot, "png": png}
                await tools.evaluate("window.flashportraitFit([])")
                results[path.name]["overview"] = _save_screenshot(
                    await tools.screenshot(), path.stem + "_overview.png", out_dir)
                if path.stem == "flashportrait_basic":
                    results[path.name]["hints"] = await tools.evaluate(HINTS)
                    results[path.name]["saved"] = await tools.evaluate(SAVED)
                if path.stem == "flashportrait_edit":
                    await tools.evaluate('window.flashportraitFit(["FlashPortraitEditExpressions", '
                                         '"FlashPortraitSaveExpressions", "FlashPortraitEvaluate"])')
                    results[path.name]["edit_nodes"] = _save_screenshot(
                        await tools.screenshot(), path.stem + "_nodes.png", out_dir)
                if path.stem == "flashportrait_fast":
                    results[path.name]["solver_hints"] = await tools.evaluate(SOLVER_HINTS)
                    sampler = next(n for n in inspected["nodes"] if n["type"] == "FlashPortraitSampler")
                    output = {"text": ["4 window(s) x 8 steps, 15 DiT passes, 1.0 s (denoising 0.9 s)"],
                              "flashportrait_report": [{"windows": 4, "latent_frames": 9, "steps": 8,
                                                        "dit_passes": 15, "steps_computed": 15,
                                                        "steps_skipped": 17, "seconds": 1.0}]}
                    await tools.evaluate('window.flashportraitFit(["FlashPortraitWindows", "FlashPortraitSampler"])')
                    results[path.name]["executed"] = await tools.evaluate(
                        f"{EXECUTED}({sampler['id']}, {json.dumps(output)})")
                    png = await tools.screenshot()
                    results[path.name]["executed_screenshot"] = _save_screenshot(
                        png, path.stem + "_after_run.png", out_dir)
            results["console"] = tools.console
        finally:
            await websocket.close()
            await session.close()
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    return results


@pytest.fixture(scope="module")
def browser_results(comfy_server, tmp_path_factory):
    browser = _browser()
    if browser is None:
        pytest.skip(f"no Chromium found ({', '.join(BROWSER_NAMES)}); scripts/setup.sh installs Debian's "
                    f"'chromium' package when run as root")
    out_dir = tmp_path_factory.mktemp("screenshots")
    return asyncio.run(_run_browser(comfy_server.url, WORKFLOWS, out_dir, browser))


def _expected_plan(frames: int, length: int, overlap: int) -> int:
    from flashportrait_core.conditioning.emotion_tokens import num_latent_frames, trim_to_4k_plus_1
    from flashportrait_core.sampling.windows import plan_windows

    return len(plan_windows(num_latent_frames(trim_to_4k_plus_1(frames)), length, overlap).windows)


@pytest.mark.parametrize("name", [p.name for p in WORKFLOWS])
def test_workflow_loads_without_missing_nodes(browser_results, name):
    inspected = browser_results[name]["inspected"]
    assert inspected["reported"] == []
    unregistered = [(n["id"], n["type"]) for n in inspected["nodes"] if not n["registered"]]
    assert unregistered == []
    assert len(inspected["nodes"]) == len(json.loads((REPO_ROOT / "workflows" / name).read_text())["nodes"])


def test_every_pack_node_is_in_the_node_library(browser_results, comfy_object_info):
    # Nodes no shipped workflow uses (Combine, Retime, Load Expressions, ...) are there for the user too.
    assert sorted(browser_results["registered"]) == sorted(t for t in comfy_object_info if t.startswith("FlashPortrait"))
    assert browser_results["flashportrait_edit.json"]["edit_nodes"].is_file()


@pytest.mark.parametrize("name", [p.name for p in WORKFLOWS])
def test_pack_nodes_carry_badge_and_colour(browser_results, name):
    pack_nodes = [n for n in browser_results[name]["inspected"]["nodes"]
                  if (n.get("comfyClass") or "").startswith("FlashPortrait")]
    assert len(pack_nodes) >= 6
    for node in pack_nodes:
        assert "⚡ FP" in node["badges"], node
        assert node["color"] == "#2f3e5c", node


@pytest.mark.parametrize("name", [p.name for p in WORKFLOWS])
def test_window_plan_widget_draws_the_servers_plan(browser_results, name):
    windows_nodes = [n for n in browser_results[name]["inspected"]["nodes"] if n["type"] == "FlashPortraitWindows"]
    assert windows_nodes
    for node in windows_nodes:
        plan = node["plan"]
        assert plan["dataset"].get("drawn") == "1", plan
        assert plan["width"] > 100 and plan["height"] > 50  # on screen, not collapsed
        assert plan["colours"] >= 4  # background, window bars, overlap shading, axis
        expected = _expected_plan(plan["preview_frames"], plan["window_length"], plan["overlap"])
        assert int(plan["dataset"]["windows"]) == expected
        assert f"{plan['preview_frames']} frames" in plan["caption"]


def test_sampler_report_widget_shows_pass_counts(browser_results):
    fast = browser_results["flashportrait_fast.json"]
    executed = fast["executed"]
    assert "ALP: 15 of 32 steps computed, 17 skipped (2.13x)" in executed["text"]
    assert executed["dataset"] == {"stepsComputed": "15", "stepsSkipped": "17"}
    assert executed["preview_frames"] == 33  # the Windows node now previews the run's 9 latent frames
    sampler = next(n for n in fast["inspected"]["nodes"] if n["type"] == "FlashPortraitSampler")
    assert sampler["report"]["height"] > 50 and "after a run" in sampler["report"]["text"]


def test_screenshots_are_real_images(browser_results):
    for name in (p.name for p in WORKFLOWS):
        image = Image.open(io.BytesIO(browser_results[name]["png"]))
        assert image.size == VIEWPORT
        pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 5  # a graph was drawn, not a blank page
        assert browser_results[name]["screenshot"].is_file()


def test_input_hints_before_queueing(browser_results):
    hints = browser_results["flashportrait_basic.json"]["hints"]
    # The pack's two badges come last (the front-end's own source badge may come first).
    assert {k: v[-2:] for k, v in hints["before"].items()} == {"sampler": ["⚡ FP", ""], "windows": ["⚡ FP", ""]}
    assert hints["after"]["sampler"][-2:] == ["⚡ FP", "⚠ 1"]  # max_side 700 is rounded
    assert hints["after"]["windows"][-2:] == ["⚡ FP", "✖ 1"]  # overlap 60 >= window_length 51 is refused
    assert "overlap 60 must be smaller than window_length 51" in hints["after"]["caption"]
    assert hints["after"]["drawn"] == "0"  # the server refuses that plan; nothing stale is left drawn
    # Queueing shows every hint first and still hands the prompt on (the server decides).
    assert hints["queued"] == 1
    [notice] = hints["notices"]
    assert notice["summary"] == "FlashPortrait input hints"
    assert "max_side 700 is not a multiple of 16: sides are rounded up to 704" in notice["detail"]
    assert "overlap 60 must be smaller than window_length 51" in notice["detail"]
    assert hints["restored"] == hints["before"]


def test_workflows_are_served_as_templates(comfy_server):
    with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates", timeout=30) as response:
        templates = json.loads(response.read())
    ours = next(names for pack, names in templates.items() if "flashportrait" in pack.lower())
    assert sorted(ours) == sorted(p.stem for p in WORKFLOWS)


def test_sampler_choice_hints(browser_results):
    hints = browser_results["flashportrait_fast.json"]["solver_hints"]
    assert hints == {"alp": "", "lora": "", "alp_adams2": "✖ 1", "lora_without_lora": "⚠ 1", "restored": ""}


def test_preview_widgets_are_neither_saved_as_values_nor_queued(browser_results):
    saved = browser_results["flashportrait_basic.json"]["saved"]
    assert saved["windows"]["widgets_values"] == [51, 30]
    assert saved["windows"]["properties"]["preview_frames"] == 777  # kept with the workflow, front-end only
    assert saved["windows"]["inputs"] == {"window_length": 51, "overlap": 30}
    assert saved["sampler"]["widgets_values"] == [42, "fixed", 30, 5.0, 720, "off", 0.0, "euler", "published", "off", 1.0]
    assert "alp_report" not in saved["sampler"]["inputs"]
