"""Extraction straight from a video file: chunked decoding, container facts, frame-rate conversion, flat memory."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flashportrait_core.expression import (
    extract_expression_features,
    extract_expression_features_from_video,
    iter_video_chunks,
    load_fan_encoder,
    probe_video,
    random_fan_encoder_state_dict,
    read_video_frames,
    resample_expressions,
)
from flashportrait_core.expression import extract as extract_module
from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend
from flashportrait_core.expression.resample import resample_positions

DRIVING = Path(__file__).resolve().parents[1] / "../shared/data/driving"


class CountingEncoder(nn.Module):
    """A small stand-in with the FanEncoder's interface: records the batch size of every forward call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.head = nn.Linear(8, 554)
        self.batches: list[int] = []

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        self.batches.append(crops.shape[0])
        out = self.head(self.conv(crops).mean(dim=(2, 3)))
        return {"headpose": out[:, :6], "eye": out[:, 6:12], "emo": out[:, 12:42], "mouth": out[:, 42:]}


@pytest.fixture(scope="module")
def backend() -> MediaPipeFaceBackend:
    with MediaPipeFaceBackend() as face_backend:
        yield face_backend


@pytest.fixture(scope="module")
def encoder():
    return load_fan_encoder(random_fan_encoder_state_dict(seed=11))


def test_probe_reads_the_container() -> None:
    info = probe_video(DRIVING / "lp_s20.mp4")
    assert (info.width, info.height, info.fps, info.frame_count) == (480, 908, 30.0, 297)
    assert info.frame_count_exact and info.rotation == 0
    assert probe_video(DRIVING / "lp_d0.mp4").fps == 25.0


def test_chunks_cover_the_video_in_order() -> None:
    chunks = list(iter_video_chunks(DRIVING / "lp_d0.mp4", chunk_size=32))
    assert [len(chunk) for chunk in chunks] == [32, 32, 14]
    assert all(chunk.dtype == np.uint8 and chunk.shape[1:] == (512, 512, 3) for chunk in chunks)
    whole, _ = read_video_frames(DRIVING / "lp_d0.mp4")
    assert torch.equal(torch.from_numpy(np.concatenate(chunks)).float() / 255, whole)
    assert [len(c) for c in iter_video_chunks(DRIVING / "lp_d0.mp4", chunk_size=5, max_frames=12)] == [5, 5, 2]


def test_display_rotation_is_applied(tmp_path: Path) -> None:
    import av

    path = tmp_path / "sideways.mp4"
    frame = read_video_frames(DRIVING / "lp_d0.mp4", max_frames=1)[0][0, :, :384]  # 512 high, 384 wide
    image = (frame * 255).round().to(torch.uint8).numpy()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 384, 512, "yuv420p"
        stream.set_display_rotation(90)  # to be shown turned a quarter counter-clockwise
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    info = probe_video(path)
    assert (info.width, info.height, info.rotation) == (512, 384, 90)
    (decoded,) = list(iter_video_chunks(path, chunk_size=4))
    assert decoded.shape == (1, 384, 512, 3)
    # Up to compression, the picture is the original turned counter-clockwise.
    difference = np.abs(decoded[0].astype(np.int16) - np.rot90(image).astype(np.int16))
    assert difference.mean() < 6


def test_file_extraction_matches_in_memory_extraction(encoder, backend) -> None:
    frames, fps = read_video_frames(DRIVING / "lp_d0.mp4", max_frames=3)
    in_memory = extract_expression_features(frames, encoder, backend, batch_size=2, smoothing=0.5, fps=fps)
    progress: list[tuple[int, int]] = []
    from_file = extract_expression_features_from_video(
        DRIVING / "lp_d0.mp4", encoder, backend, batch_size=2, smoothing=0.5, max_frames=3, target_fps=None,
        on_progress=lambda done, total: progress.append((done, total)))
    assert from_file.features.shape == (3, 554) and from_file.fps == 25.0 and from_file.source_frames == 3
    assert from_file.frame_size == (512, 512)
    torch.testing.assert_close(from_file.points, in_memory.points)
    # Same pixels (decoded 8-bit frames either way), same points: the same features up to float rounding.
    torch.testing.assert_close(from_file.features, in_memory.features, rtol=1e-4, atol=1e-4)
    # Detection then encoding, 2 frames at a time.
    assert progress == [(2, 6), (3, 6), (5, 6), (6, 6)]
    assert from_file.report().startswith("3 frames, face found in 3, 0 filled by interpolation; 25 fps")


def test_resample_positions() -> None:
    # 30 -> 25 fps: every output frame is 1.2 source frames later; 31 source frames last 1 s -> 26 output frames.
    positions = resample_positions(31, 30.0, 25.0)
    assert len(positions) == 26
    np.testing.assert_allclose(positions[:6], [0, 1.2, 2.4, 3.6, 4.8, 6.0])
    assert positions[-1] == 30.0
    assert len(resample_positions(1, 30.0, 25.0)) == 1
    assert len(resample_positions(10, 25.0, 50.0)) == 19  # up-sampling: every source frame plus midpoints
    with pytest.raises(ValueError, match="target_fps"):
        resample_positions(10, 25.0, 0.0)


def test_frame_rate_conversion_interpolates_features_in_time(backend) -> None:
    encoder = CountingEncoder().eval()
    source = extract_expression_features_from_video(DRIVING / "lp_d3.mp4", encoder, backend, batch_size=8,
                                                    max_frames=31, target_fps=0)
    assert source.fps == 30.0 and source.features.shape[0] == 31
    converted = resample_expressions(source, 25.0)
    assert converted.features.shape == (26, 554) and converted.fps == 25.0
    assert converted.source_fps == 30.0 and converted.source_frames == 31
    # Output frame 5 is at 0.2 s = source frame 6; output frame 1 at source position 1.2.
    torch.testing.assert_close(converted.features[5], source.features[6])
    torch.testing.assert_close(converted.features[1], 0.8 * source.features[1] + 0.2 * source.features[2])
    torch.testing.assert_close(converted.points[1], 0.8 * source.points[1] + 0.2 * source.points[2])
    assert converted.report().startswith("26 frames, face found in 26")
    assert "25 fps, resampled from 31 frames at 30 fps" in converted.report()
    assert resample_expressions(source, 30.0) is source
    # The same through the file entry point's target_fps.
    direct = extract_expression_features_from_video(DRIVING / "lp_d3.mp4", encoder, backend, batch_size=8,
                                                    max_frames=31, target_fps=25.0)
    torch.testing.assert_close(direct.features, converted.features)


def test_resampled_frame_is_found_only_when_its_sources_are() -> None:
    from flashportrait_core.expression.extract import ExpressionFeatures

    count = 7
    found = torch.tensor([True, True, False, True, True, True, True])
    expressions = ExpressionFeatures(features=torch.arange(count, dtype=torch.float32)[:, None].expand(-1, 554),
                                     points=torch.zeros(count, 5, 2), boxes=torch.zeros(count, 4), found=found,
                                     filled_frames=[2], fps=30.0, source_fps=30.0)
    converted = resample_expressions(expressions, 25.0)  # positions 0, 1.2, 2.4, 3.6, 4.8, 6.0
    assert converted.found.tolist() == [True, False, False, True, True, True]
    assert converted.filled_frames == [1, 2]


def test_chunks_stay_bounded_on_a_long_video(backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most two decoded chunks are alive at once, and the encoder never sees more than a chunk of crops."""
    real_chunks = extract_module.iter_video_chunks
    most_alive = []

    def watched_chunks(*args, **kwargs):
        alive: list[weakref.ref] = []
        for chunk in real_chunks(*args, **kwargs):
            alive = [ref for ref in alive if ref() is not None]
            most_alive.append(len(alive) + 1)
            alive.append(weakref.ref(chunk))
            yield chunk

    monkeypatch.setattr(extract_module, "iter_video_chunks", watched_chunks)
    encoder = CountingEncoder().eval()
    result = extract_expression_features_from_video(DRIVING / "lp_d6.mp4", encoder, backend, batch_size=8,
                                                    max_frames=100, target_fps=0)
    assert result.features.shape == (100, 554)
    assert len(most_alive) == 2 * 13  # 100 frames in chunks of 8, decoded twice
    assert max(most_alive) <= 2
    # Chunks of 8 crops; on the CPU the encoder runs them in micro-batches of 4.
    assert sum(encoder.batches) == 100 and max(encoder.batches) == 4
