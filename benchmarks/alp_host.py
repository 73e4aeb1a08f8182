"""ALP on the real host: the shipped basic workflow with the tiny models, every acceleration preset.

Starts one ComfyUI server, runs the workflow once to warm its caches (the expression extraction and the
model loads are then reused: only the sampler runs again), then for each repeat seed runs every preset
and reads the sampler's report: DiT passes and the wall time of its window loop. Prints one table with medians and
the ratios to the full run, measured in the same run.

"4-step LoRA" is the published fast path: the tiny distillation LoRA (converted for ComfyUI's loader) applied
with LoraLoaderModelOnly between the model loader and the sampler, and the sampler's 4-step schedule.

    .venv/bin/python benchmarks/alp_host.py [--steps 30] [--repeats 3] [--presets off fast "4-step LoRA"]
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scripts import comfy_client, host  # noqa: E402
from flashportrait_core.lora_keys import convert_step_distill_lora  # noqa: E402
from scripts.make_tiny_models import write_tiny_models  # noqa: E402
from scripts.workflow_prep import TINY_MODELS, Settings, load_ui_workflow, prepare_prompt  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data"
REFERENCE = DATA / "reference" / "fp_case1.png"
DRIVING = DATA / "driving" / "lp_d0.mp4"
PRESETS = ("off", "quality", "balanced", "fast", "4-step LoRA")
FOUR_STEP = "4-step LoRA"
CONVERTED_LORA = "fast_lora_tiny_comfy.safetensors"
REPORT = re.compile(r"(\d+) window\(s\) x (\d+) steps \(\w+\), (\d+) DiT passes \([^)]*\), [\d.]+ s "
                    r"\(denoising ([\d.]+) s\)")


def sampler_report(prompt: dict, entry: dict) -> tuple[int, float, str]:
    for node_id, output in entry["outputs"].items():
        if prompt[node_id]["_meta"]["title"] == "Sampler report":
            text = "".join(output["text"])
            match = REPORT.search(text)
            return int(match.group(3)), float(match.group(4)), text
    raise RuntimeError("the workflow produced no sampler report")


def insert_lora(prompt: dict, lora_name: str) -> None:
    """LoraLoaderModelOnly between the model loader and the sampler, as a user applies the distillation LoRA."""
    sampler = next(node for node in prompt.values() if node["class_type"] == "FlashPortraitSampler")
    prompt["fast_lora"] = {"class_type": "LoraLoaderModelOnly", "_meta": {"title": "Distillation LoRA"},
                           "inputs": {"model": sampler["inputs"]["model"], "lora_name": lora_name,
                                      "strength_model": 1.0}}
    sampler["inputs"]["model"] = ["fast_lora", 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-side", type=int, default=128)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS,
                        help="which to run; off (the full run) is always included")
    args = parser.parse_args()
    presets = ["off"] + [p for p in args.presets if p != "off"]

    models_dir = REPO_ROOT / ".models" / "tiny"
    paths = write_tiny_models(models_dir)
    save_file(convert_step_distill_lora(load_file(str(paths["fast_lora"]))),
              str(paths["fast_lora"].with_name(CONVERTED_LORA)))
    comfy_dir = host.provision(log=lambda message: None)
    results: dict[str, list[tuple[int, float]]] = {name: [] for name in presets}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        with host.start_server(models_dir, work / "in", work / "out", work / "tmp", comfyui_dir=comfy_dir) as server:
            shutil.copy(REFERENCE, server.input_dir / REFERENCE.name)
            shutil.copy(DRIVING, server.input_dir / DRIVING.name)
            info = comfy_client.object_info(server.url)

            def run(preset: str, seed: int) -> tuple[int, float, str]:
                prompt = comfy_client.ui_to_api(load_ui_workflow(), info)
                settings = Settings(seed=seed, steps=args.steps, max_side=args.max_side, window_length=8,
                                    window_overlap=4, max_frames=49, acceleration=preset,
                                    filename_prefix=f"video/alp_{preset}")
                prepare_prompt(prompt, TINY_MODELS, REFERENCE.name, DRIVING.name, settings)
                if preset == FOUR_STEP:
                    insert_lora(prompt, CONVERTED_LORA)
                entry = comfy_client.run_prompt(server.url, prompt, timeout=3600, is_alive=server.is_running)
                return sampler_report(prompt, entry)

            run("off", 10_000)  # warm-up: extraction, model loads
            for repeat in range(args.repeats):
                for preset in presets:
                    passes, seconds, text = run(preset, repeat)
                    results[preset].append((passes, seconds))
                    print(f"repeat {repeat} {preset}: {passes} DiT passes, denoising {seconds:.2f} s", flush=True)
                    if repeat == 0:
                        print(f"--- {preset}\n{text}")

    full_passes = statistics.median(p for p, _ in results["off"])
    full_seconds = statistics.median(s for _, s in results["off"])
    print(f"\nbasic workflow, tiny models, 49 driving frames -> 13 latent frames, windows 8/4, "
          f"{args.steps} steps, {args.max_side}px; medians of {args.repeats} runs")
    print(f"{'preset':<12} {'DiT passes':>10} {'passes ratio':>12} {'denoise s':>10} {'time ratio':>10} "
          f"{'per-repeat ratios':>20}  denoise s of each repeat")
    for preset in presets:
        passes = statistics.median(p for p, _ in results[preset])
        seconds = statistics.median(s for _, s in results[preset])
        # Each repeat runs every preset back to back: its own full/preset ratio is less exposed to load drift.
        ratios = [off[1] / mine[1] for off, mine in zip(results["off"], results[preset])]
        print(f"{preset:<12} {passes:>10.0f} {full_passes / passes:>11.2f}x {seconds:>10.2f} "
              f"{full_seconds / seconds:>9.2f}x {' '.join(f'{r:.2f}' for r in ratios):>20}  "
              f"{' '.join(f'{s:.1f}' for _, s in results[preset])}")


if __name__ == "__main__":
    main()
