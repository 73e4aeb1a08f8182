"""MediaPipe face backend on real driving videos."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flashportrait_core.expression import FaceTrack, read_video_frames
from flashportrait_core.expression.extract import to_uint8
from flashportrait_core.expression.mediapipe_backend import (
    REACQUIRE_AFTER_FRAMES,
    MediaPipeFaceBackend,
    MediaPipeUnavailableError,
    choose_face,
    import_mediapipe,
)

DRIVING = Path(__file__).resolve().parents[1] / "../shared/data/driving"
FIRST_FRAMES = 30


def _first_frames(name: str, count: int = FIRST_FRAMES) -> np.ndarray:
    frames, _ = read_video_frames(DRIVING / name, max_frames=count)
    return to_uint8(frames)


@pytest.fixture(scope="module")
def backend() -> MediaPipeFaceBackend:
    with MediaPipeFaceBackend() as face_backend:
        yield face_backend


@pytest.mark.parametrize("name", ["lp_d0.mp4", "lp_d19.mp4", "lp_s13.mp4", "lp_s20.mp4", "lp_s29.mp4"])
def test_finds_the_face_in_real_videos(backend: MediaPipeFaceBackend, name: str) -> None:
    frames = _first_frames(name)
    track = backend.detect(frames)
    assert isinstance(track, FaceTrack)
    assert track.points.shape == (FIRST_FRAMES, 5, 2) and track.points.dtype == np.float32
    assert track.boxes.shape == (FIRST_FRAMES, 4) and track.found.dtype == bool
    assert track.found.mean() >= 0.99
    points, boxes = track.points[track.found], track.boxes[track.found]
    height, width = frames.shape[1:3]
    assert (points[..., 0] > 0).all() and (points[..., 0] < width).all()
    assert (points[..., 1] > 0).all() and (points[..., 1] < height).all()
    # Points lie inside the face box; "left" points are on the image's left; eyes above nose above mouth.
    assert (points[..., 0] >= boxes[:, None, 0]).all() and (points[..., 0] <= boxes[:, None, 2]).all()
    assert (points[..., 1] >= boxes[:, None, 1]).all() and (points[..., 1] <= boxes[:, None, 3]).all()
    assert (points[:, 0, 0] < points[:, 1, 0]).all() and (points[:, 3, 0] < points[:, 4, 0]).all()
    eyes_y, nose_y, mouth_y = points[:, :2, 1].mean(1), points[:, 2, 1], points[:, 3:, 1].mean(1)
    assert (eyes_y < nose_y).all() and (nose_y < mouth_y).all()


def test_small_face_of_full_body_video_is_located(backend: MediaPipeFaceBackend) -> None:
    track = backend.detect(_first_frames("lp_s13.mp4", 5))
    assert track.found.all()
    # The face is small (about 80 px wide in a 720x1080 frame) and near the top centre.
    widths = track.boxes[:, 2] - track.boxes[:, 0]
    assert (widths > 50).all() and (widths < 150).all()
    assert (track.points[..., 1] < 200).all() and (np.abs(track.points[..., 0] - 360) < 100).all()
    eye_distance = np.linalg.norm(track.points[:, 1] - track.points[:, 0], axis=-1)
    assert (eye_distance > 20).all() and (eye_distance < 60).all()


def test_chunks_continue_tracking(backend: MediaPipeFaceBackend) -> None:
    frames = _first_frames("lp_d0.mp4", 12)
    whole = backend.detect(frames)
    parts = [backend.detect(frames[:5]), backend.detect(frames[5:], reset=False)]
    np.testing.assert_allclose(FaceTrack.concatenate(parts).points, whole.points, atol=1e-3)


def test_keeps_the_largest_face(backend: MediaPipeFaceBackend) -> None:
    big = _first_frames("lp_d19.mp4", 1)[0]  # 480x480
    small = _first_frames("lp_d0.mp4", 1)[0][::2, ::2]  # 256x256
    canvas = np.zeros((480, 800, 3), dtype=np.uint8)
    canvas[:, 320:] = big
    canvas[100:356, 20:276] = small
    track = backend.detect(canvas[None])
    assert track.found.all()
    assert (track.points[0, :, 0] > 320).all()  # the points belong to the big face on the right


def test_largest_face_wins_whatever_the_mesh_order(backend: MediaPipeFaceBackend) -> None:
    # MediaPipe happens to list the big face first above; the choice must not depend on that order.
    def face(x0: float, size: float) -> SimpleNamespace:
        grid = np.linspace(0, size, 478)
        return SimpleNamespace(landmark=[SimpleNamespace(x=x0 + v, y=0.2 + v) for v in grid])

    result = SimpleNamespace(multi_face_landmarks=[face(0.1, 0.1), face(0.5, 0.3), face(0.05, 0.02)])
    mesh = SimpleNamespace(process=lambda image: result)
    landmarks = backend._largest_mesh_face(mesh, np.zeros((100, 200, 3), np.uint8))
    assert landmarks.shape == (478, 2)
    np.testing.assert_allclose(landmarks[0], [0.5 * 200, 0.2 * 100])


def _two_face_video(count: int, small_from: int, big_from: int) -> np.ndarray:
    """Side-by-side composite of two real driving videos on a 480x800 canvas: a small face (lp_d0 at half
    size, 256 px, on the left) and a big one (lp_d19, 480 px, on the right), each shown from the given frame."""
    small = _first_frames("lp_d0.mp4", count)[:, ::2, ::2]
    big = _first_frames("lp_d19.mp4", count)
    canvas = np.zeros((count, 480, 800, 3), dtype=np.uint8)
    canvas[small_from:, 100:356, 20:276] = small[small_from:]
    canvas[big_from:, :, 320:] = big[big_from:]
    return canvas


def test_followed_face_is_kept_when_a_bigger_one_appears(backend: MediaPipeFaceBackend) -> None:
    # The small face is alone for 8 frames; then a bigger face appears beside it and stays.
    track = backend.detect(_two_face_video(20, small_from=0, big_from=8))
    assert track.found.all()
    # Every frame's points belong to the small face on the left (x < 276), none hop to the big one.
    assert (track.points[..., 0] < 276).all()
    eye_distance = np.linalg.norm(track.points[:, 1] - track.points[:, 0], axis=-1)
    assert eye_distance.max() < 1.5 * eye_distance.min()


def test_largest_face_is_taken_at_the_start_and_kept(backend: MediaPipeFaceBackend) -> None:
    track = backend.detect(_two_face_video(16, small_from=0, big_from=0))
    assert track.found.all()
    assert (track.points[..., 0] > 320).all()  # the big face on the right, every frame
    # Chunked: the followed face carries over the chunk border.
    frames = _two_face_video(16, small_from=0, big_from=0)
    parts = [backend.detect(frames[:6]), backend.detect(frames[6:], reset=False)]
    assert (FaceTrack.concatenate(parts).points[..., 0] > 320).all()


def test_lost_face_is_not_replaced_by_another_until_it_stays_away(backend: MediaPipeFaceBackend) -> None:
    # The small face is followed; the big face appears at frame 4; the small face vanishes from frame 8.
    frames = _two_face_video(8 + REACQUIRE_AFTER_FRAMES + 4, small_from=0, big_from=4)
    frames[8:, :, :300] = 0
    track = backend.detect(frames)
    assert track.found[:8].all() and (track.points[:8, :, 0] < 276).all()
    # While the followed face is away, frames are reported without a face (they get interpolated) ...
    gone = slice(8, 8 + REACQUIRE_AFTER_FRAMES)
    assert not track.found[gone].any()
    # ... and once it has been away long enough, the remaining face is taken.
    assert track.found[8 + REACQUIRE_AFTER_FRAMES:].all()
    assert (track.points[8 + REACQUIRE_AFTER_FRAMES:, :, 0] > 320).all()


def test_one_face_mesh_takes_over_only_holding_the_followed_face(backend: MediaPipeFaceBackend) -> None:
    # One face: after the first frame the one-face mesh (no detector while it tracks) finds every frame.
    backend.detect(_first_frames("lp_d19.mp4", 3))
    assert backend._tracking_followed
    # Two faces, the big one followed; a one-face mesh that holds the small face is not used and is restarted.
    frames = _two_face_video(6, small_from=0, big_from=0)
    backend.detect(frames[:1])
    small_face = SimpleNamespace(landmark=[SimpleNamespace(x=0.05 + 0.3 * v, y=0.2 + 0.5 * v)
                                           for v in np.linspace(0, 1, 478)])
    wrong = SimpleNamespace(process=lambda image: SimpleNamespace(multi_face_landmarks=[small_face]),
                            close=lambda: None)
    backend._tracking_mesh, backend._tracking_followed = wrong, False
    track = backend.detect(frames[1:], reset=False)
    assert track.found.all() and (track.points[..., 0] > 320).all()
    assert backend._tracking_mesh is not wrong and not backend._tracking_followed
    assert backend._handover_wait == REACQUIRE_AFTER_FRAMES - 4  # waited through the 4 frames after the restart


def test_choose_face_follows_the_nearest_matching_box() -> None:
    left, right = np.array([0.0, 0, 100, 100]), np.array([300.0, 0, 500, 200])
    assert choose_face([left, right], None) == 1  # nothing followed yet: the largest
    assert choose_face([left, right], np.array([10.0, 5, 110, 105])) == 0  # the one that moved a little
    assert choose_face([right], np.array([10.0, 5, 110, 105])) is None  # the followed face is not there
    assert choose_face([np.array([0.0, 0, 300, 300])], left) is None  # same place, three times the size
    assert choose_face([], None) is None


def test_no_face_frames_are_reported(backend: MediaPipeFaceBackend) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(2, 240, 320, 3), dtype=np.uint8)
    frames = np.concatenate([np.zeros((1, 240, 320, 3), np.uint8), noise])
    track = backend.detect(frames)
    assert not track.found.any()
    assert np.isnan(track.points).all() and np.isnan(track.boxes).all()


def test_rejects_bad_frames(backend: MediaPipeFaceBackend) -> None:
    with pytest.raises(ValueError, match="uint8"):
        backend.detect(np.zeros((1, 64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        backend.detect(np.zeros((64, 64, 3), dtype=np.uint8))


def test_missing_mediapipe_says_how_to_install(hide_module) -> None:
    hide_module("mediapipe")
    with pytest.raises(ImportError, match=r"pip install mediapipe==0\.10\.21.*numpy<2") as raised:
        import_mediapipe()
    assert isinstance(raised.value, MediaPipeUnavailableError)
