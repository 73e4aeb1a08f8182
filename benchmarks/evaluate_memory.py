"""Peak memory and speed of FlashPortrait Evaluate on a written video file: a short and a long video.

The videos are made by concatenating real driving clips (25 fps, 512x512). Each run happens in a fresh process:
the driving performance is extracted from the file (streamed), then the same file is evaluated against it
(identity with an insightface-format recognition model written for the run, expression fidelity, seams for the
published windows of 51 latent frames with overlap 30), and the process's peak resident memory (ru_maxrss) is
printed. Streaming keeps the two runs within a few percent however long the video is.

    .venv/bin/python benchmarks/evaluate_memory.py                  # real-size PD-FGC (random weights), 10 s vs 60 s
    .venv/bin/python benchmarks/evaluate_memory.py --encoder small  # a small stand-in encoder: minutes less

`--worker VIDEO` runs one extraction + evaluation and prints one JSON line (used by the test suite).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from driving_clips import concatenate_clips

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIPS = ("lp_d0.mp4", "lp_d11.mp4", "lp_d12.mp4")  # all 512x512 at 25 fps
FPS = 25
REFERENCE = REPO_ROOT.parent / "shared" / "data" / "reference" / "fp_case1.png"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _encoder(kind: str):
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from flashportrait_core.expression import load_fan_encoder, random_fan_encoder_state_dict

    if kind == "small":
        from small_encoder import SmallEncoder

        return SmallEncoder().eval()
    return load_fan_encoder(random_fan_encoder_state_dict(seed=0))


def worker(video: str, encoder_kind: str, batch_size: int) -> dict:
    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import numpy as np
    import torch
    from PIL import Image
    from tiny_recognition import write_recognition_model

    from flashportrait_core.evaluation import RecognitionModel, evaluate_output, evaluation_report
    from flashportrait_core.expression import extract_expression_features_from_video, iter_video_chunks, probe_video
    from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend

    encoder = _encoder(encoder_kind)
    reference = np.array(Image.open(REFERENCE).convert("RGB"))
    with tempfile.TemporaryDirectory() as folder:
        recognition = RecognitionModel(write_recognition_model(Path(folder) / "w600k_r50.onnx"))
        with MediaPipeFaceBackend() as backend:
            start = time.perf_counter()
            driving = extract_expression_features_from_video(video, encoder, backend, batch_size=batch_size,
                                                             smoothing=0.5)
            extracted = time.perf_counter()
            info = probe_video(video)

            def passes():
                for chunk in iter_video_chunks(video, batch_size):
                    yield torch.from_numpy(chunk)

            evaluation = evaluate_output(passes, info.frame_count, info.fps, driving, encoder, backend,
                                         reference_image=reference, recognition=recognition, windows=(51, 30),
                                         driving_offset=0)
            evaluated = time.perf_counter()
    return {"frames": evaluation.frame_count, "peak_rss_mb": round(_peak_rss_mb(), 1),
            "extraction_seconds": round(extracted - start, 1), "evaluation_seconds": round(evaluated - extracted, 1),
            "evaluation_frames_per_second": round(evaluation.frame_count / (evaluated - extracted), 2),
            "faces": int(evaluation.face_found.sum()), "boundaries": len(evaluation.boundaries),
            "report": evaluation_report(evaluation).splitlines()[1]}


def make_video(path: Path, frames: int) -> int:
    """The real clips concatenated (re-encoded, H.264, 512x512, 25 fps) to `frames` frames."""
    return concatenate_clips(path, CLIPS, frames, 512, FPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", metavar="VIDEO", help="run one extraction + evaluation, print a JSON line")
    parser.add_argument("--encoder", choices=("pdfgc", "small"), default="pdfgc")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--short", type=float, default=10.0, help="short video length (s)")
    parser.add_argument("--long", type=float, default=60.0, help="long video length (s)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.encoder, args.batch_size)))
        return
    with tempfile.TemporaryDirectory() as folder:
        results = {}
        for seconds in (args.short, args.long):
            video = Path(folder) / f"{seconds:g}s.mp4"
            frames = make_video(video, int(round(seconds * FPS)))
            command = [sys.executable, __file__, "--worker", str(video), "--encoder", args.encoder,
                       "--batch-size", str(args.batch_size)]
            completed = subprocess.run(command, capture_output=True, text=True, check=True)
            results[frames] = json.loads(completed.stdout.strip().splitlines()[-1])
            print(f"{frames / FPS:5.0f} s ({frames} frames): {results[frames]}", flush=True)
        short, long = (results[frames]["peak_rss_mb"] for frames in sorted(results))
        print(f"peak RSS: {short:.0f} MB (short) vs {long:.0f} MB (long): {100 * (long / short - 1):+.1f}%")


if __name__ == "__main__":
    main()
