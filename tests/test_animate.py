"""The main job (scripts/animate.py) end to end on the tiny models: each run starts its own real server."""
from __future__ import annotations

from pathlib import Path

import av
import pytest

from scripts import animate

pytestmark = pytest.mark.graph

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MEDIA = ["--reference", str(DATA / "reference" / "fp_case1.png"), "--driving", str(DATA / "driving" / "lp_d0.mp4")]
SMALL = ["--tiny", "--max-frames", "5", "--max-side", "32", "--steps", "1"]


def _frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_two_runs_leave_two_files_and_a_rejected_input_fails_naming_it(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "FlashPortrait_00001_.mp4").write_bytes(b"a user's earlier video")
    assert animate.main([*MEDIA, *SMALL, "--seed", "1", "--out", str(out)]) == 0
    assert animate.main([*MEDIA, *SMALL, "--seed", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Wrote {out / 'FlashPortrait_00002_.mp4'}" in printed
    assert f"Wrote {out / 'FlashPortrait_00003_.mp4'}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["FlashPortrait_00001_.mp4", "FlashPortrait_00002_.mp4",
                                                     "FlashPortrait_00003_.mp4"]
    assert (out / "FlashPortrait_00001_.mp4").read_bytes() == b"a user's earlier video"
    # 5 driving frames = 2 latent frames = 5 video frames, less the reference frame.
    assert _frames(out / "FlashPortrait_00002_.mp4") == _frames(out / "FlashPortrait_00003_.mp4") == 4

    # A value ComfyUI rejects: the server would skip the sampler and still run the rest; the job fails instead.
    assert animate.main([*MEDIA, *SMALL, "--seed", "-1", "--out", str(out)]) == 1
    errors = capsys.readouterr().err
    assert "FlashPortrait failed: the server would skip nodes whose inputs it rejected" in errors
    assert "(FlashPortraitSampler) input 'seed': Value -1 smaller than min of 0" in errors
    assert len(list(out.iterdir())) == 3


def test_keep_video_numbers_past_existing_files(tmp_path):
    source = tmp_path / "FlashPortrait_00001_.mp4"
    source.write_bytes(b"new")
    out = tmp_path / "out"
    out.mkdir()
    (out / "FlashPortrait_00007_.mp4").write_bytes(b"old")
    (out / "Other_00009_.mp4").write_bytes(b"other")
    assert animate.keep_video(source, out).name == "FlashPortrait_00008_.mp4"
    assert animate.keep_video(source, out).name == "FlashPortrait_00009_.mp4"
    assert (out / "FlashPortrait_00007_.mp4").read_bytes() == b"old"
    plain = tmp_path / "clip.mp4"
    plain.write_bytes(b"x")
    assert animate.keep_video(plain, out).name == "clip_00001_.mp4"
