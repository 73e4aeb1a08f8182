"""The drift monitor on real media: identity with an insightface-format recognition model (tests/tiny_recognition.py)
on the real portraits, expression fidelity of a video against its own extraction, seams where windows meet, the
plot and the report.

The recognition model is not trained (none can be had here): it is a fixed function of the aligned face crop, so
what is checked is the pipeline around it (face points, ArcFace alignment, normalisation, onnxruntime, cosine),
not how well a real model tells people apart.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from flashportrait_core.evaluation import (Evaluation, RecognitionModel, evaluate_output,  # noqa: E402
                                           evaluation_report, find_recognition_model, plot_evaluation)
from flashportrait_core.evaluation.identity import RecognitionModelNotFoundError, recognition_models  # noqa: E402
from flashportrait_core.evaluation.monitor import reference_embedding  # noqa: E402
from flashportrait_core.evaluation.seams import boundary_transitions, output_plan  # noqa: E402
from flashportrait_core.expression import extract_expression_features_from_video, read_video_frames  # noqa: E402
from flashportrait_core.expression.extract import rgb_chunk  # noqa: E402
from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend  # noqa: E402
from real_performances import DRIVING, driving, driving_frames, encoder, portrait  # noqa: E402
from small_encoder import SmallEncoder  # noqa: E402
from tiny_insightface import PlantedFace, write_scrfd  # noqa: E402
from tiny_recognition import write_recognition_model  # noqa: E402

PORTRAITS = ("fp_case1.png", "fp_case2.png", "fp_case3.png", "lp_s0.jpg", "lp_s1.jpg", "lp_s3.jpg", "lp_s9.jpg")


@pytest.fixture(scope="module")
def backend():
    with MediaPipeFaceBackend() as face_backend:
        yield face_backend


@pytest.fixture(scope="module")
def recognition(tmp_path_factory) -> RecognitionModel:
    return RecognitionModel(write_recognition_model(tmp_path_factory.mktemp("pack") / "w600k_r50.onnx"))


def _passes(frames: torch.Tensor, batch_size: int = 8):
    def passes():
        for start in range(0, frames.shape[0], batch_size):
            yield rgb_chunk(frames, start, min(start + batch_size, frames.shape[0]))
    return passes


def test_same_image_scores_one_and_different_people_lower(backend, recognition: RecognitionModel) -> None:
    embeddings = {name: reference_embedding(portrait(name), backend, recognition) for name in PORTRAITS}
    assert all(e is not None and e.shape == (512,) for e in embeddings.values())
    for name, embedding in embeddings.items():
        again = reference_embedding(portrait(name), backend, recognition)
        assert float(embedding @ again) == pytest.approx(1.0, abs=1e-6)
    different = [float(embeddings[a] @ embeddings[b]) for i, a in enumerate(PORTRAITS) for b in PORTRAITS[i + 1:]]
    # Two frames of one driving video (the same person, another expression) score above every pair of people.
    frames = (driving_frames() * 255).round().to(torch.uint8).numpy()
    same_person = float(reference_embedding(frames[0], backend, recognition)
                        @ reference_embedding(frames[7], backend, recognition))
    assert max(different) < same_person < 1.0 - 1e-4
    assert max(different) < 0.95


def test_input_normalisation_is_read_from_the_graph(tmp_path: Path, backend, recognition: RecognitionModel) -> None:
    inside = RecognitionModel(write_recognition_model(tmp_path / "a" / "w600k_r50.onnx", normalises_input=True))
    one_at_a_time = RecognitionModel(write_recognition_model(tmp_path / "b" / "w600k_r50.onnx", fixed_batch=True))
    assert (recognition.mean, recognition.std) == (127.5, 127.5) and (inside.mean, inside.std) == (0.0, 1.0)
    image = portrait("fp_case2.png")
    expected = reference_embedding(image, backend, recognition)
    np.testing.assert_allclose(reference_embedding(image, backend, inside), expected, atol=1e-5)
    np.testing.assert_allclose(reference_embedding(image, backend, one_at_a_time), expected, atol=1e-6)


def test_recognition_model_is_found_in_the_users_packs(tmp_path: Path) -> None:
    root = tmp_path / "insightface"
    with pytest.raises(RecognitionModelNotFoundError) as missing:
        find_recognition_model([root])
    assert str(missing.value) == (
        f"no face-recognition model found: add w600k_r50.onnx (from insightface's buffalo_l pack) to "
        f"{root / 'models' / 'buffalo_l'}/ or glintr100.onnx (antelopev2) to {root / 'models' / 'antelopev2'}/; "
        f"searched {root}")
    write_recognition_model(root / "models" / "buffalo_l" / "w600k_r50.onnx")
    write_recognition_model(root / "models" / "antelopev2" / "glintr100.onnx")
    assert [p.relative_to(root).as_posix() for p in recognition_models([root])] == [
        "models/antelopev2/glintr100.onnx", "models/buffalo_l/w600k_r50.onnx"]
    assert find_recognition_model([root]).name == "glintr100.onnx"  # auto: the larger model first
    assert find_recognition_model([root], "buffalo_l/w600k_r50.onnx").name == "w600k_r50.onnx"
    with pytest.raises(RecognitionModelNotFoundError, match="buffalo_s/w600k_mbf.onnx is gone; no face-recognition"):
        find_recognition_model([root], "buffalo_s/w600k_mbf.onnx")
    # A detector under a recognition model's name is refused for what it is.
    wrong = write_scrfd(tmp_path / "wrong" / "w600k_r50.onnx", [PlantedFace(1, 1, 0.9, (1, 1, 1, 1))])
    with pytest.raises(ValueError, match="w600k_r50.onnx is not an ArcFace recognition model: its input is "):
        RecognitionModel(wrong)


def test_expression_fidelity_of_a_video_against_its_own_extraction_is_exact(backend) -> None:
    """driving() was extracted from lp_d0.mp4's first 8 frames; the same frames evaluated with the same extractor
    give the same features, bit for bit."""
    frames = driving_frames()
    evaluation = evaluate_output(_passes(frames), frames.shape[0], driving().fps, driving(), encoder(), backend,
                                 driving_offset=0)
    assert evaluation.frame_count == 8 and evaluation.face_found.all()
    assert {name: float(np.abs(e).max()) for name, e in evaluation.absolute_errors.items()} == {
        "head_pose": 0.0, "eyes": 0.0, "emotion": 0.0, "mouth": 0.0}
    assert "expression fidelity on 8 frames" in evaluation_report(evaluation)


def test_fidelity_from_the_video_file_is_exact_and_streamed(backend) -> None:
    """The written-file path: the whole lp_d0.mp4 (78 frames) against its own extraction, decoded in chunks (a
    small stand-in encoder keeps this fast; the extractor around it is the real one)."""
    from flashportrait_core.expression.video import iter_video_chunks

    small = SmallEncoder().eval()
    video = DRIVING / "lp_d0.mp4"
    performance = extract_expression_features_from_video(video, small, backend, batch_size=16, smoothing=0.5)

    def passes():
        for chunk in iter_video_chunks(video, 16):
            yield torch.from_numpy(chunk)

    evaluation = evaluate_output(passes, 78, 25.0, performance, small, backend, driving_offset=0)
    assert evaluation.frame_count == 78 and evaluation.changes.shape == (77,)
    assert all(float(np.abs(e).max()) == 0.0 for e in evaluation.absolute_errors.values())


def _coverage_boundaries(plan, frame_count: int, offset: int) -> list[int]:
    """Independent oracle: frame pairs whose latent frames are covered by different sets of windows."""
    def covering(output_frame: int) -> frozenset[int]:
        decoded = output_frame + offset
        latent = 0 if decoded == 0 else (decoded + 3) // 4
        return frozenset(k for k, (start, end) in enumerate(plan.windows) if start <= latent < end)
    return [t for t in range(frame_count - 1) if covering(t) != covering(t + 1)]


@pytest.mark.parametrize("frames, offset, length, overlap", [(40, 1, 4, 1), (41, 0, 4, 1), (80, 1, 6, 3),
                                                             (200, 1, 51, 30), (500, 1, 51, 30), (8, 1, 51, 30)])
def test_window_boundaries_are_where_the_window_cover_changes(frames, offset, length, overlap) -> None:
    plan = output_plan(frames, offset, length, overlap)
    assert boundary_transitions(plan, frames, offset) == _coverage_boundaries(plan, frames, offset)


def test_seams_are_found_where_windows_meet(backend) -> None:
    """Real frames (lp_d0) as a 40-frame output of windows of 4 latent frames with overlap 1; a brightness jump
    put at two of the window boundaries is reported there, and only there."""
    frames = read_video_frames(DRIVING / "lp_d0.mp4", max_frames=40)[0]
    plan = output_plan(40, 1, 4, 1)
    boundaries = boundary_transitions(plan, 40, 1)
    assert boundaries == [7, 11, 19, 23, 35]
    seamed = frames.clone()
    for at in (11, 23):
        seamed[at + 1:] = (seamed[at + 1:] + 0.12).clamp(max=1.0)
    small = SmallEncoder().eval()
    performance = extract_expression_features_from_video(DRIVING / "lp_d0.mp4", small, backend, batch_size=16,
                                                         smoothing=0.5, max_frames=41)
    clean = evaluate_output(_passes(frames, 16), 40, 25.0, performance, small, backend, windows=(4, 1))
    found = evaluate_output(_passes(seamed, 16), 40, 25.0, performance, small, backend, windows=(4, 1))
    assert clean.boundaries == found.boundaries == boundaries
    assert max(clean.seam_ratios) < 2.0
    flagged = [t for t, ratio in zip(found.boundaries, found.seam_ratios) if ratio > 2.0]
    assert flagged == [11, 23]
    assert "2 above 2x: frame pairs [11, 23]" in evaluation_report(found)
    assert "0 above 2x" in evaluation_report(clean)
    # Here output frame j is driving frame j, evaluated as if it showed driving frame j + 1: not exact.
    assert min(float(e.mean()) for e in clean.errors.values()) > 0.01


def test_identity_in_the_monitor_and_its_skips(backend, recognition: RecognitionModel) -> None:
    frames = driving_frames()
    small = SmallEncoder().eval()
    own = evaluate_output(_passes(frames), 8, 25.0, driving(), small, backend, reference_image=portrait("fp_case1.png"),
                          recognition=recognition, driving_offset=0)
    first_frame = (frames[0] * 255).round().to(torch.uint8).numpy()
    itself = evaluate_output(_passes(frames), 8, 25.0, driving(), small, backend, reference_image=first_frame,
                             recognition=recognition, driving_offset=0)
    assert own.similarity.shape == (8,) and np.isfinite(own.similarity).all()
    # The driving person against a photo of someone else, and against its own first frame.
    assert itself.similarity[0] > 0.999 and itself.similarity.min() > own.similarity.max()
    assert f"identity ({recognition.description}): cosine to the reference median" in evaluation_report(own)
    blank = np.full((64, 64, 3), 128, np.uint8)
    no_face = evaluate_output(_passes(frames), 8, 25.0, driving(), small, backend, reference_image=blank,
                              recognition=recognition, driving_offset=0)
    assert no_face.similarity is None
    assert "identity: skipped: no face found in reference_image" in evaluation_report(no_face)
    skipped = evaluate_output(_passes(frames), 8, 25.0, driving(), small, backend,
                              identity_note="skipped: no face-recognition model found: add w600k_r50.onnx")
    assert "identity: skipped: no face-recognition model found: add w600k_r50.onnx" in evaluation_report(skipped)
    empty = evaluate_output(_passes(torch.full((5, 64, 64, 3), 0.5)), 5, 25.0, driving(), small, backend)
    assert "expression fidelity: skipped: no face found in any of the 5 output frames" in evaluation_report(empty)


def _synthetic(count: int = 100) -> Evaluation:
    similarity = np.full(count, 0.8)
    similarity[30:40] = np.linspace(0.45, 0.3, 10)
    similarity[80] = 0.49
    similarity[90] = np.nan
    found = np.isfinite(similarity)
    errors = {name: np.full(count, 0.1) for name in ("head_pose", "eyes", "emotion", "mouth")}
    errors["mouth"][50:75] = 0.9
    return Evaluation(frame_count=count, fps=25.0, driving_offset=1, threshold=0.5, face_found=found,
                      similarity=similarity, identity_note="buffalo_l/w600k_r50.onnx", errors=errors,
                      absolute_errors={k: v / 10 for k, v in errors.items()}, changes=np.full(count - 1, 0.01),
                      boundaries=[19, 39], seam_ratios=[1.1, 3.0])


def test_report_names_the_worst_stretches() -> None:
    lines = evaluation_report(_synthetic()).splitlines()
    assert lines[0] == "100 output frames at 25 fps, output frame 0 = driving frame 1"
    assert lines[1] == "faces: found in 99 of 100 output frames; none in frame 90 (3.60-3.64 s)"
    assert lines[2] == ("identity (buffalo_l/w600k_r50.onnx): cosine to the reference median 0.800, mean 0.754, "
                        "lowest 0.300 at frame 39 (1.56 s); 11 frame(s) below 0.5 in 2 stretch(es), longest: "
                        "frames 30-39 (1.20-1.60 s), lowest 0.300, frame 80 (3.20-3.24 s), lowest 0.490")
    assert "mouth 0.300 (absolute 0.03; worst 0.900 at frames 50-74 (2.00-3.00 s))" in lines[3]
    assert lines[4].endswith("worst 3.00x at frames 39-40 (1.60 s); 1 above 2x: frame pairs [39]")


@pytest.mark.parametrize("width, height", [(1280, 960), (1283, 721), (320, 240)])
def test_plot_is_an_image_of_the_right_size(width: int, height: int) -> None:
    with_identity = plot_evaluation(_synthetic(), width, height)
    skipped = _synthetic()
    skipped.similarity, skipped.identity_note = None, "skipped: no face-recognition model found"
    without = plot_evaluation(skipped, width, height)
    assert with_identity.shape == without.shape == (height, width, 3) and with_identity.dtype == np.uint8
    assert with_identity.std() > 10 and np.abs(with_identity.astype(int) - without).mean() > 0.5
    # The frames below the threshold are drawn in red.
    red = (with_identity[..., 0] > 180) & (with_identity[..., 1] < 80) & (with_identity[..., 2] < 80)
    assert red.sum() > 20
    with pytest.raises(ValueError, match="at least 320x240"):
        plot_evaluation(_synthetic(), 100, 100)
