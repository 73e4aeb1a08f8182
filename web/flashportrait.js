// FlashPortrait's front-end extension:
// - one colour and a "⚡ FP" badge on the pack's nodes, so a graph reads at a glance among other packs;
// - the Windows node draws its window plan over the timeline for a preview frame count (the plan itself comes
//   from the server's /flashportrait/window_plan, the sampler's own planner, never re-implemented here);
// - the Sampler shows its report after a run: DiT passes, ALP steps computed and skipped;
// - input hints (a warning badge on the node, and a notice when queueing) for settings the server would
//   round or refuse.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PACK_PREFIX = "FlashPortrait";
const NODE_COLOR = "#2f3e5c";
const NODE_BGCOLOR = "#1e273a";
const BADGE_BG = "#3d5a99";
const WARN_BG = "#a86b00";
const ERROR_BG = "#a83232";
const WINDOW_COLORS = ["#4f8fe8", "#e8a33d"];
const OVERLAP_COLOR = "#c95fd1";
const PLAN_HEIGHT = 96;
const DEFAULT_PREVIEW_FRAMES = 500; // 20 s at 25 fps, until a run gives the real count
const SIDE_MULTIPLE = 16;
const FOUR_STEP_LORA = "4-step LoRA";
const BADGE_TEXT = "⚡ FP"; // the host's own source badge may already show the pack's full name

const isPackNode = (node) => node.comfyClass?.startsWith(PACK_PREFIX);
const widgetOf = (node, name) => node.widgets?.find((w) => w.name === name);
const valueOf = (node, name) => widgetOf(node, name)?.value;

// ---------------------------------------------------------------------------------------------------------
// Input hints: [{level: "warn" | "error", text}] per node type, shown before the prompt reaches the server.
// ---------------------------------------------------------------------------------------------------------

// A target speed-up applies to an ALP preset only; below or at 1 it is no speed-up.
function targetHints(node) {
  const hints = [];
  const speedup = Number(valueOf(node, "target_speedup"));
  const acceleration = valueOf(node, "acceleration");
  if (speedup > 0 && (acceleration === "off" || acceleration === FOUR_STEP_LORA)) {
    hints.push({ level: "error", text: `target_speedup ${speedup} needs an ALP preset (quality, balanced or fast), not '${acceleration}'` });
  } else if (speedup > 0 && speedup <= 1) {
    hints.push({ level: "error", text: `target_speedup ${speedup} is no speed-up: set it above 1, or 0 for the preset` });
  }
  return hints;
}

function maxSideHints(node) {
  const maxSide = Number(valueOf(node, "max_side"));
  if (!Number.isFinite(maxSide) || maxSide % SIDE_MULTIPLE === 0) return [];
  const rounded = Math.ceil(maxSide / SIDE_MULTIPLE) * SIDE_MULTIPLE;
  return [{ level: "warn", text: `max_side ${maxSide} is not a multiple of 16: sides are rounded up to ${rounded}` }];
}

// The samplers (KSamplerSelect) of the SamplerCustomAdvanced nodes a guider feeds.
function samplersFedBy(node) {
  const names = [];
  for (const linkId of node.outputs?.[0]?.links ?? []) {
    const links = app.graph?.links;
    const link = typeof links?.get === "function" ? links.get(linkId) : links?.[linkId];
    const consumer = link && app.graph.getNodeById(link.target_id);
    if (consumer?.comfyClass !== "SamplerCustomAdvanced") continue;
    const select = consumer.getInputNode?.(consumer.findInputSlot("sampler"));
    const name = select && valueOf(select, "sampler_name");
    if (name) names.push(name);
  }
  return names;
}

const HINT_RULES = {
  FlashPortraitSampler(node) {
    const hints = [...maxSideHints(node), ...targetHints(node)];
    // The sampler checks these only when it runs, after the models are loaded: say so before queueing.
    const acceleration = valueOf(node, "acceleration");
    const solver = valueOf(node, "sampler") ?? "euler";
    const fourStep = acceleration === FOUR_STEP_LORA;
    if (solver !== "euler" && acceleration !== "off") {
      hints.push({ level: "error", text: `sampler ${solver} does not combine with acceleration '${acceleration}': set sampler to euler or acceleration to off` });
    }
    if (solver === "adams3" && !fourStep && Number(valueOf(node, "steps")) < 8) {
      hints.push({ level: "error", text: "sampler adams3 needs at least 8 steps" });
    }
    if (fourStep) {
      const model = node.getInputNode?.(node.findInputSlot("model"));
      if (model && !/lora/i.test(model.comfyClass ?? "")) {
        hints.push({ level: "warn", text: `${FOUR_STEP_LORA} without a LoRA loader before the model: 4 steps give a blurred result` });
      }
    }
    return hints;
  },
  FlashPortraitGuider(node) {
    const hints = [...maxSideHints(node), ...targetHints(node)];
    const acceleration = valueOf(node, "acceleration");
    const others = samplersFedBy(node).filter((name) => name !== "euler");
    if (acceleration !== "off" && others.length) {
      hints.push({ level: "error", text: `ALP ('${acceleration}') runs only with the euler sampler, not ${others.join(", ")}: choose euler in KSamplerSelect or set acceleration to off` });
    }
    return hints;
  },
  FlashPortraitWindows(node) {
    const hints = [];
    const length = Number(valueOf(node, "window_length"));
    const overlap = Number(valueOf(node, "overlap"));
    if (overlap >= length) {
      hints.push({ level: "error", text: `overlap ${overlap} must be smaller than window_length ${length}` });
    }
    return hints;
  },
};

// A fixed-height DOM widget that only displays: never saved in the workflow nor sent with the prompt.
function addDisplayWidget(node, name, type, element, height) {
  const widget = node.addDOMWidget(name, type, element, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => height,
    getMaxHeight: () => height,
  });
  widget.serialize = false;
  return widget;
}

function nodeHints(node) {
  return HINT_RULES[node.comfyClass]?.(node) ?? [];
}

function hintBadge(node) {
  const hints = nodeHints(node);
  if (!hints.length) return new LGraphBadge({ text: "" }); // invisible
  const error = hints.some((h) => h.level === "error");
  return new LGraphBadge({ text: `${error ? "✖" : "⚠"} ${hints.length}`, bgColor: error ? ERROR_BG : WARN_BG });
}

function showQueueNotice(hints) {
  const detail = hints.map(({ node, text }) => `#${node.id} ${node.title}: ${text}`).join("\n");
  const toast = app.extensionManager?.toast;
  if (toast?.add) {
    toast.add({ severity: "warn", summary: "FlashPortrait input hints", detail, life: 8000 });
  } else {
    console.warn(`FlashPortrait input hints:\n${detail}`);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Window plan widget (FlashPortrait Windows)
// ---------------------------------------------------------------------------------------------------------

async function fetchWindowPlan(frames, length, overlap) {
  const query = new URLSearchParams({ frames, length, overlap });
  const response = await api.fetchApi(`/flashportrait/window_plan?${query}`);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ?? `window plan: HTTP ${response.status}`);
  return body;
}

function drawWindowPlan(canvas, plan) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(120, canvas.clientWidth || 300);
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(PLAN_HEIGHT * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.fillStyle = "#15181f";
  ctx.fillRect(0, 0, width, PLAN_HEIGHT);

  const pad = 8;
  const axisY = PLAN_HEIGHT - 20;
  const x = (frame) => pad + (frame / plan.latent_frames) * (width - 2 * pad);
  const windows = plan.windows;
  // Few windows: one row each. Many: two alternating lanes, so overlaps still show.
  const lanes = windows.length <= 6 ? windows.length : 2;
  const laneHeight = Math.max(3, (axisY - 6 - pad) / lanes);

  windows.forEach(([start, end], k) => {
    const lane = lanes === windows.length ? k : k % 2;
    const y = pad + lane * laneHeight;
    ctx.fillStyle = WINDOW_COLORS[k % 2];
    ctx.globalAlpha = 0.85;
    ctx.fillRect(x(start), y, Math.max(1, x(end) - x(start)), laneHeight - 2);
    ctx.globalAlpha = 1;
    const overlap = plan.overlaps[k];
    if (overlap > 0) {
      // The cross-faded frames: shaded on the window and marked on the timeline.
      ctx.fillStyle = OVERLAP_COLOR;
      ctx.globalAlpha = 0.55;
      ctx.fillRect(x(start), y, Math.max(1, x(start + overlap) - x(start)), laneHeight - 2);
      ctx.globalAlpha = 1;
      ctx.fillRect(x(start), axisY - 4, Math.max(1, x(start + overlap) - x(start)), 4);
    }
  });

  ctx.strokeStyle = "#9aa3b5";
  ctx.beginPath();
  ctx.moveTo(x(0), axisY);
  ctx.lineTo(x(plan.latent_frames), axisY);
  ctx.stroke();
  ctx.fillStyle = "#cfd6e4";
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "top";
  const tickCount = Math.min(plan.latent_frames, 6);
  for (let i = 0; i <= tickCount; i++) {
    const frame = Math.round((i / tickCount) * plan.latent_frames);
    const px = x(frame);
    ctx.fillRect(px, axisY, 1, 4);
    ctx.textAlign = i === 0 ? "left" : i === tickCount ? "right" : "center";
    ctx.fillText(String(frame), px, axisY + 6);
  }
}

function planCaption(plan) {
  const count = plan.windows.length;
  const stride = plan.length - plan.overlap;
  const head = `${plan.video_frames} frames → ${plan.latent_frames} latent frames (${plan.kept_frames} kept)`;
  if (count === 1) return `${head}: one window covers the video`;
  return `${head}: ${count} windows of ${plan.length}, overlap ${plan.overlap}, stride ${stride}`;
}

function addWindowPlanWidget(node) {
  node.properties ??= {};
  node.properties.preview_frames ??= DEFAULT_PREVIEW_FRAMES;

  // Front-end only: the frame count to preview is kept in the node's properties, never sent to the server
  // (so changing it does not re-run the sampler).
  const frames = node.addWidget("number", "preview_frames", node.properties.preview_frames, (value) => {
    node.properties.preview_frames = Math.max(1, Math.round(value));
    schedule();
  }, { min: 1, max: 1000000, step: 10, step2: 1, precision: 0, round: 1, serialize: false });
  frames.serialize = false;
  frames.tooltip = "Driving video frames to preview the plan for (front-end only; a run sets it to the real count)";

  const container = document.createElement("div");
  container.className = "flashportrait-window-plan";
  container.style.cssText = "display:flex;flex-direction:column;gap:2px;font:11px sans-serif;color:#cfd6e4;";
  const canvas = document.createElement("canvas");
  canvas.style.cssText = `width:100%;height:${PLAN_HEIGHT}px;border-radius:4px;`;
  const caption = document.createElement("div");
  const hintLine = document.createElement("div");
  hintLine.style.color = "#ffb347";
  container.append(canvas, caption, hintLine);

  const widget = addDisplayWidget(node, "window_plan", "flashportrait_window_plan", container, PLAN_HEIGHT + 34);

  let request = 0;
  let timer = null;
  let lastPlan = null;
  async function update() {
    const hints = nodeHints(node);
    hintLine.textContent = hints.map((h) => h.text).join("; ");
    const mine = ++request;
    try {
      const plan = await fetchWindowPlan(node.properties.preview_frames, valueOf(node, "window_length"),
                                         valueOf(node, "overlap"));
      if (mine !== request) return; // a newer request is on its way
      lastPlan = plan;
      drawWindowPlan(canvas, plan);
      caption.textContent = planCaption(plan);
      container.dataset.windows = String(plan.windows.length);
      container.dataset.latentFrames = String(plan.latent_frames);
      container.dataset.drawn = "1";
    } catch (error) {
      if (mine !== request) return;
      lastPlan = null;
      canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height); // no stale plan beside the error
      caption.textContent = String(error.message ?? error);
      container.dataset.drawn = "0";
    }
    node.setDirtyCanvas(true, true);
  }
  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(update, 120);
  }

  for (const name of ["window_length", "overlap"]) {
    const input = widgetOf(node, name);
    if (!input) continue;
    const callback = input.callback;
    input.callback = function (...args) {
      const result = callback?.apply(this, args);
      schedule();
      return result;
    };
  }
  new ResizeObserver(() => lastPlan && drawWindowPlan(canvas, lastPlan)).observe(canvas);

  node.flashportraitSetPreviewFrames = (count) => {
    node.properties.preview_frames = count;
    frames.value = count;
    schedule();
  };
  const onConfigure = node.onConfigure;
  node.onConfigure = function (...args) {
    const result = onConfigure?.apply(this, args);
    frames.value = node.properties.preview_frames ?? DEFAULT_PREVIEW_FRAMES;
    schedule();
    return result;
  };
  schedule();
}

// ---------------------------------------------------------------------------------------------------------
// Sampler report widget (FlashPortrait Sampler)
// ---------------------------------------------------------------------------------------------------------

function addSamplerReportWidget(node) {
  const container = document.createElement("div");
  container.className = "flashportrait-sampler-report";
  container.style.cssText = "display:flex;flex-direction:column;gap:3px;font:11px sans-serif;color:#cfd6e4;";
  const summary = document.createElement("div");
  summary.textContent = "Pass counts appear here after a run.";
  const bar = document.createElement("div");
  bar.style.cssText = "display:flex;height:8px;border-radius:3px;overflow:hidden;background:#2a2f3a;";
  const computedBar = document.createElement("div");
  computedBar.style.cssText = "background:#4f8fe8;width:0%;";
  const skippedBar = document.createElement("div");
  skippedBar.style.cssText = "background:#5fc97a;width:0%;";
  bar.append(computedBar, skippedBar);
  const details = document.createElement("pre");
  details.style.cssText = "margin:0;white-space:pre-wrap;font:10px monospace;max-height:90px;overflow:auto;";
  container.append(summary, bar, details);

  const widget = addDisplayWidget(node, "alp_report", "flashportrait_report", container, 130);

  const onExecuted = node.onExecuted;
  node.onExecuted = function (output) {
    onExecuted?.apply(this, arguments);
    const counts = output?.flashportrait_report?.[0];
    const text = output?.text?.join?.("") ?? "";
    details.textContent = text;
    if (!counts) return;
    const total = counts.steps_computed + counts.steps_skipped;
    const speedup = total / Math.max(1, counts.steps_computed);
    summary.textContent = `ALP: ${counts.steps_computed} of ${total} steps computed, ${counts.steps_skipped} skipped`
      + ` (${speedup.toFixed(2)}x) · ${counts.windows} window(s) · ${counts.dit_passes} DiT passes · ${counts.seconds} s`;
    computedBar.style.width = `${(100 * counts.steps_computed) / Math.max(1, total)}%`;
    skippedBar.style.width = `${(100 * counts.steps_skipped) / Math.max(1, total)}%`;
    container.dataset.stepsComputed = String(counts.steps_computed);
    container.dataset.stepsSkipped = String(counts.steps_skipped);
    // The Windows node feeding this sampler (or guider) now previews the real frame count.
    const windowsNode = node.getInputNode?.(node.findInputSlot("windows"));
    if (counts.latent_frames && windowsNode?.flashportraitSetPreviewFrames) {
      windowsNode.flashportraitSetPreviewFrames((counts.latent_frames - 1) * 4 + 1);
    }
    node.setDirtyCanvas(true, true);
  };
}

// ---------------------------------------------------------------------------------------------------------

app.registerExtension({
  name: "FlashPortrait.Interface",
  nodeCreated(node) {
    if (!isPackNode(node)) return;
    node.color = NODE_COLOR;
    node.bgcolor = NODE_BGCOLOR;
    node.badges ??= [];
    node.badges.push(new LGraphBadge({ text: BADGE_TEXT, bgColor: BADGE_BG, fgColor: "#ffffff" }));
    node.badges.push(() => hintBadge(node));
    if (node.comfyClass === "FlashPortraitWindows") addWindowPlanWidget(node);
    if (node.comfyClass === "FlashPortraitSampler" || node.comfyClass === "FlashPortraitGuider") {
      addSamplerReportWidget(node);
    }
  },
  setup() {
    // SamplerCustomAdvanced returns latents only: the guider sends its report to its own node after a run.
    api.addEventListener("flashportrait.report", (event) => {
      const node = app.graph?.getNodeById?.(Number(event.detail?.node)) ?? app.graph?.getNodeById?.(event.detail?.node);
      node?.onExecuted?.(event.detail.output);
    });
    // Hints are shown before the prompt is queued; the server still refuses what it cannot run.
    const queuePrompt = app.queuePrompt.bind(app);
    app.queuePrompt = async function (...args) {
      const hints = (app.graph?.nodes ?? []).filter(isPackNode)
        .flatMap((node) => nodeHints(node).map((hint) => ({ node, ...hint })));
      if (hints.length) showQueueNotice(hints);
      return queuePrompt(...args);
    };
  },
});
