"""Bad and unusual driving inputs: each is handled correctly or stopped with an error that says what to do."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flashportrait_core.expression import (
    VideoReadError,
    extract_expression_features,
    extract_expression_features_from_video,
    read_video_frames,
    similarity_to_template,
)
from flashportrait_core.expression.extract import align_chunk
from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend

from small_encoder import SmallEncoder  # noqa: E402

DRIVING = Path(__file__).resolve().parents[1] / "../shared/data/driving"


@pytest.fixture(scope="module")
def backend() -> MediaPipeFaceBackend:
    with MediaPipeFaceBackend() as face_backend:
        yield face_backend


@pytest.fixture(scope="module")
def small_encoder() -> SmallEncoder:
    return SmallEncoder().eval()


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return read_video_frames(DRIVING / "lp_d0.mp4", max_frames=4)[0]


def write_video(path: Path, images: np.ndarray, fps: int = 25, pix_fmt: str = "yuv420p",
                options: dict | None = None, codec: str = "libx264") -> Path:
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = images.shape[1:3]
        stream.pix_fmt = pix_fmt
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_no_face_in_a_video_file(tmp_path: Path, small_encoder, backend) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(6, 128, 160, 3), dtype=np.uint8)
    video = write_video(tmp_path / "noise.mp4", noise)
    with pytest.raises(ValueError, match="no face found in any of the 6 driving frames; use a video where a face"):
        extract_expression_features_from_video(video, small_encoder, backend)


def test_two_faces_follow_the_larger(small_encoder, backend, frames: torch.Tensor) -> None:
    big = read_video_frames(DRIVING / "lp_d19.mp4", max_frames=4)[0]  # 480x480
    canvas = torch.zeros(4, 480, 800, 3)
    canvas[:, 100:356, 20:276] = frames[:, ::2, ::2]  # a second, smaller face on the left
    canvas[:, :, 320:] = big
    result = extract_expression_features(canvas, small_encoder, backend, batch_size=2)
    assert result.found.all()
    assert (result.points[..., 0] > 320).all() and (result.boxes[:, 0] > 320).all()


def test_corrupted_files(tmp_path: Path, small_encoder, backend) -> None:
    original = (DRIVING / "lp_d0.mp4").read_bytes()
    # Random bytes over the middle of the stream: the decoder conceals the damage, every frame comes out.
    damaged = bytearray(original)
    middle = len(damaged) // 2
    damaged[middle:middle + 20000] = np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    (tmp_path / "damaged.mp4").write_bytes(bytes(damaged))
    result = extract_expression_features_from_video(tmp_path / "damaged.mp4", small_encoder, backend,
                                                    batch_size=32, max_frames=40)
    assert result.features.shape == (40, 554) and torch.isfinite(result.features).all()
    # Cut short with the index at the front: the frames before the cut are used, and the report says so.
    frames = read_video_frames(DRIVING / "lp_d0.mp4", max_frames=30)[0]
    images = (frames * 255).round().to(torch.uint8).numpy()
    front = write_video(tmp_path / "front.mp4", images, options={"movflags": "faststart"})
    data = front.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    result = extract_expression_features_from_video(tmp_path / "cut.mp4", small_encoder, backend, batch_size=8)
    assert 5 < result.features.shape[0] < 30
    assert "the container states 30 frames" in result.report()
    # Cut short with the index at the end (lp_d0): nothing can be read.
    (tmp_path / "cut_end.mp4").write_bytes(original[: len(original) // 2])
    with pytest.raises(VideoReadError, match="cannot decode"):
        extract_expression_features_from_video(tmp_path / "cut_end.mp4", small_encoder, backend)
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 50)
    with pytest.raises(VideoReadError, match="cannot decode"):
        extract_expression_features_from_video(tmp_path / "text.mp4", small_encoder, backend)


def test_empty_and_zero_length_videos(tmp_path: Path, small_encoder, backend) -> None:
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoReadError, match=r"empty file \(0 bytes\)"):
        extract_expression_features_from_video(tmp_path / "empty.mp4", small_encoder, backend)
    with av.open(str(tmp_path / "zero.mp4"), "w") as container:  # a container written without any frame
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoReadError, match="has no video frames"):
        extract_expression_features_from_video(tmp_path / "zero.mp4", small_encoder, backend)
    with pytest.raises(FileNotFoundError, match="driving video not found"):
        extract_expression_features_from_video(tmp_path / "missing.mp4", small_encoder, backend)


def test_single_frame(tmp_path: Path, small_encoder, backend, frames: torch.Tensor) -> None:
    result = extract_expression_features(frames[:1], small_encoder, backend, smoothing=1.0)
    assert result.features.shape == (1, 554) and result.found.tolist() == [True]
    images = (frames[:1] * 255).round().to(torch.uint8).numpy()
    video = write_video(tmp_path / "one.mp4", images, fps=30)
    from_file = extract_expression_features_from_video(video, small_encoder, backend, smoothing=1.0,
                                                       target_fps=25.0)
    assert from_file.features.shape == (1, 554) and from_file.source_fps == 30.0 and from_file.fps == 25.0


def test_grey_and_rgba_frames_and_a_grey_video(tmp_path: Path, small_encoder, backend,
                                               frames: torch.Tensor) -> None:
    grey = frames[:2].mean(dim=-1, keepdim=True)  # [2, H, W, 1]
    rgba = torch.cat([frames[:2], torch.full_like(frames[:2, ..., :1], 0.3)], dim=-1)
    from_grey = extract_expression_features(grey, small_encoder, backend)
    from_rgba = extract_expression_features(rgba, small_encoder, backend)
    from_rgb = extract_expression_features(frames[:2], small_encoder, backend)
    assert from_grey.found.all() and from_rgba.found.all()
    torch.testing.assert_close(from_rgba.features, from_rgb.features)  # alpha is ignored
    # The face is found in grey at nearly the same place as in colour.
    assert (from_grey.points - from_rgb.points).abs().max() < 6.0
    images = (grey.expand(-1, -1, -1, 3) * 255).round().to(torch.uint8).numpy()
    # A grey-only video (FFV1 in Matroska: one plane, and no frame count in the container).
    video = write_video(tmp_path / "grey.mkv", images, pix_fmt="gray", codec="ffv1")
    with av.open(str(video)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "gray"
    from_grey_video = extract_expression_features_from_video(video, small_encoder, backend)
    assert from_grey_video.found.all() and from_grey_video.features.shape == (2, 554)
    torch.testing.assert_close(from_grey_video.points, from_grey.points, rtol=0, atol=1.0)


def test_odd_frame_sizes(tmp_path: Path, small_encoder, backend, frames: torch.Tensor) -> None:
    odd = frames[:2, 40:407, 20:501]  # 367 x 481
    result = extract_expression_features(odd, small_encoder, backend)
    assert result.found.all() and result.frame_size == (367, 481)
    # Points land on the same face, shifted by the crop offset.
    whole = extract_expression_features(frames[:2], small_encoder, backend)
    assert (result.points + torch.tensor([20.0, 40.0]) - whole.points).abs().max() < 3.0
    # An odd-sized video (yuv420p needs even sides: libx264 gets 481 x 367 padded by the encoder's scaler).
    images = (odd[:, :366, :480] * 255).round().to(torch.uint8).numpy()
    video = write_video(tmp_path / "odd.mp4", images)
    assert extract_expression_features_from_video(video, small_encoder, backend).found.all()


def test_huge_frame_is_found_and_aligned_like_the_original(backend, small_encoder, frames: torch.Tensor) -> None:
    """A 4K frame: a real 512x512 frame upscaled to 2160x2160 on a 3840x2160 canvas. The face is found where the
    original's is (scaled), and the same points give the same aligned crop: only the face region is warped."""
    original = frames[:1]
    scale = 2160 / 512
    upscaled = F.interpolate(original.permute(0, 3, 1, 2), size=(2160, 2160), mode="bicubic",
                             align_corners=False).clamp(0, 1).permute(0, 2, 3, 1)
    huge = torch.zeros(1, 2160, 3840, 3)
    huge[:, :, 840:3000] = upscaled
    small_result = extract_expression_features(original, small_encoder, backend)
    huge_result = extract_expression_features(huge, small_encoder, backend)
    assert huge_result.found.all() and huge_result.frame_size == (2160, 3840)
    assert torch.isfinite(huge_result.features).all()
    # Pixel centres: x_huge = (x + 0.5) * scale - 0.5 + 840.
    expected_points = (small_result.points + 0.5) * scale - 0.5 + torch.tensor([840.0, 0.0])
    assert (huge_result.points - expected_points).abs().max() < 4 * scale  # within 4 original pixels
    points = small_result.points.to(torch.float64)
    crop = align_chunk(original, similarity_to_template(points), torch.device("cpu"))
    huge_points = (points + 0.5) * scale - 0.5 + torch.tensor([840.0, 0.0], dtype=torch.float64)
    huge_crop = align_chunk(huge, similarity_to_template(huge_points), torch.device("cpu"))
    assert (huge_crop - crop).abs().mean() < 2e-3  # [-1, 1] scale: a quarter of one 8-bit level
