"""Performance files: a save -> load round trip is bit-exact; no file is overwritten; foreign or damaged files are
refused with a message that says what the file is and what to do."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashportrait_core.conditioning.prompt_file import save_conditioning_file
from flashportrait_core.expression.edit import combine, lock_head_pose, scale_components
from flashportrait_core.expression.performance_file import (FORMAT_NAME, PerformanceFileError, describe, free_path,
                                                            load_performance, save_performance)
from flashportrait_core.expression.resample import resample_expressions
from real_performances import driving, reference_features, talking


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal bit for bit: dtype, shape and every byte (NaN where NaN)."""
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def _edited():
    """A performance with every kind of field set: resampled, combined (a frame without a face), two edits."""
    first = scale_components(driving(), {"mouth": 1.5, "eyes": 0.0}, "driving mean")
    second = resample_expressions(talking(), 25.0)
    second.found[2] = False
    combined, _ = combine(first, second, {"emotion": "second"}, "ping-pong")
    return lock_head_pose(combined, reference_features())


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    original = _edited()
    assert original.landmarks is not None and original.filled_frames == [2, 6] and len(original.edits) == 3
    path = save_performance(tmp_path / "take.safetensors", original)
    loaded = load_performance(path)
    for name in ("features", "points", "boxes", "found", "landmarks"):
        assert _same(getattr(loaded, name), getattr(original, name)), name
    for name in ("filled_frames", "fps", "source_fps", "source_frames", "smoothing", "frame_size", "notes", "source",
                 "face_backend", "edits"):
        assert getattr(loaded, name) == getattr(original, name), name
    assert loaded.source == "lp_d0.mp4" and loaded.fps == 25.0
    assert describe(loaded) == f"8 frames at 25 fps from lp_d0.mp4; edits: {'; '.join(original.edits)}"
    # Small: the 554 features per frame dominate, about 2.3 kB a frame here.
    assert path.stat().st_size < 8 * 554 * 4 + 8 * 478 * 2 * 4 + 8192


def test_metadata_says_what_the_file_is(tmp_path: Path) -> None:
    performance = driving()
    path = save_performance(tmp_path / "p.safetensors", performance)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    info = json.loads(metadata["performance"])
    assert metadata["format"] == FORMAT_NAME and metadata["version"] == "1"
    assert {k: info[k] for k in ("frame_count", "fps", "source", "edits")} == {
        "frame_count": 8, "fps": 25.0, "source": "lp_d0.mp4", "edits": []}


def test_no_file_is_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "take.safetensors"
    path.write_bytes(b"the user's own file")
    with pytest.raises(FileExistsError):
        save_performance(path, driving())
    assert path.read_bytes() == b"the user's own file"
    assert free_path(tmp_path, "take") == tmp_path / "take_00001.safetensors"
    save_performance(free_path(tmp_path, "take"), driving())
    assert free_path(tmp_path, "take") == tmp_path / "take_00002.safetensors"
    assert free_path(tmp_path, "new") == tmp_path / "new.safetensors"


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    conditioning = save_conditioning_file(tmp_path / "prompt.safetensors", torch.zeros(1, 4, 8), torch.zeros(1, 4, 8),
                                          torch.zeros(1, 257, 16))
    with pytest.raises(PerformanceFileError, match="prompt.safetensors is not a FlashPortrait expressions file "
                                                   "\\(its format is 'flashportrait.conditioning'\\); save one with "
                                                   "FlashPortrait Save Expressions"):
        load_performance(conditioning)
    lora = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.blocks.0.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(PerformanceFileError, match="lora.safetensors is not a FlashPortrait expressions file \\(it "
                                                   "holds diffusion_model.blocks.0.lora_down.weight and no "
                                                   "FlashPortrait metadata\\)"):
        load_performance(lora)
    pickle = tmp_path / "model.safetensors"
    torch.save({"features": torch.zeros(2, 554)}, pickle)  # a torch pickle under a safetensors name
    with pytest.raises(PerformanceFileError, match="cannot read model.safetensors as an expressions file .*damaged or "
                                                   "not a safetensors file"):
        load_performance(pickle)
    with pytest.raises(FileNotFoundError, match="expressions file not found"):
        load_performance(tmp_path / "gone.safetensors")


def test_damaged_files_are_refused(tmp_path: Path) -> None:
    good = save_performance(tmp_path / "good.safetensors", driving())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(PerformanceFileError, match="cannot read truncated.safetensors .*damaged"):
        load_performance(truncated)

    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as file:
        metadata = file.metadata()
    tensors = load_file(str(good))

    def rewritten(name: str, tensors=tensors, **changes) -> Path:
        info = json.loads(metadata["performance"])
        info.update(changes.pop("info", {}))
        path = tmp_path / name
        save_file(tensors, str(path), metadata={**metadata, "performance": json.dumps(info), **changes})
        return path

    cases = [
        (rewritten("count.safetensors", info={"frame_count": 9}), "its metadata says 9 frames, the tensors hold 8"),
        (rewritten("fps.safetensors", info={"fps": 0}), "its frame rate is 0"),
        (rewritten("json.safetensors", performance="{not json"), "its metadata is damaged"),
        (rewritten("nan.safetensors", tensors={**tensors, "features": tensors["features"].clone().fill_(math.nan)}),
         "its features hold NaN or infinite values"),
        (rewritten("points.safetensors", tensors={**tensors, "points": tensors["points"][:3]}),
         "points are \\[3, 5, 2\\], expected \\[8, 5, 2\\]"),
        (rewritten("lacks.safetensors", tensors={k: v for k, v in tensors.items() if k != "boxes"}), "it lacks boxes"),
        (rewritten("width.safetensors", tensors={**tensors, "features": tensors["features"][:, :512].contiguous()}),
         "features are \\[8, 512\\], not \\[frames, 554\\]"),
    ]
    for path, message in cases:
        with pytest.raises(PerformanceFileError, match=f"{path.name}.*{message}"):
            load_performance(path)
    newer = rewritten("newer.safetensors", version="2")
    with pytest.raises(PerformanceFileError, match="saved in expressions format 2, this pack reads format 1: update "
                                                   "the FlashPortrait pack"):
        load_performance(newer)


def test_saving_refuses_what_is_not_a_performance(tmp_path: Path) -> None:
    import dataclasses

    broken = dataclasses.replace(driving(), features=driving().features.clone().fill_(math.inf))
    with pytest.raises(ValueError, match="NaN or infinite"):
        save_performance(tmp_path / "x.safetensors", broken)
    assert not (tmp_path / "x.safetensors").exists()
