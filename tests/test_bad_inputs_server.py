"""Bad inputs through one real ComfyUI server: each fails with an error naming the input, and the server runs a
good graph right after (it stays healthy).

Covered here: driving media (no face, two faces, corrupt, empty, zero frames, single frame, grey, RGBA, odd size,
4K), wrong checkpoints in the model slots (portrait encoder, LoRA, SDXL, Wan text-to-video, a truncated file),
window overlap >= window length (refused at validation), a window longer than the video (clipped, reported).
A NaN reference image cannot be made with ComfyUI's core nodes; tests/test_validation.py covers it in-process.
"""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from scripts import comfy_client
from scripts.workflow_prep import TINY_MODELS, tiny_animation_prompt

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DRIVING = DATA / "driving" / "lp_d0.mp4"  # 512x512, 25 fps
TWO_FACES_SOURCE = DATA / "driving" / "lp_d19.mp4"  # 480x480
REFERENCE = DATA / "reference" / "fp_case1.png"
TEST_FILE_PREFIX = "zz_bad_input_"  # checkpoints this file writes into the tiny model folders (removed after)

pytestmark = pytest.mark.graph


# --- media --------------------------------------------------------------------------------------------------

def _driving_frames(count: int) -> np.ndarray:
    with av.open(str(DRIVING)) as container:
        frames = [frame.to_ndarray(format="rgb24") for _, frame in zip(range(count), container.decode(video=0))]
    return np.stack(frames)


def _write_video(path: Path, images: np.ndarray, image_format: str = "rgb24", codec: str = "libx264",
                 pix_fmt: str = "yuv420p", fps: int = 25) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = images.shape[1:3]
        stream.pix_fmt = pix_fmt
        for image in images:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format=image_format)))
        container.mux(stream.encode())


def _zero_frame_video(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()


def _two_faces(path: Path) -> None:
    small = _driving_frames(3)[:, ::2, ::2]  # a 256x256 face on the left
    with av.open(str(TWO_FACES_SOURCE)) as container:
        big = np.stack([f.to_ndarray(format="rgb24") for _, f in zip(range(3), container.decode(video=0))])
    canvas = np.zeros((3, 480, 800, 3), dtype=np.uint8)
    canvas[:, 100:356, 20:276] = small
    canvas[:, :, 320:] = big
    _write_video(path, canvas)


def _four_k(path: Path) -> None:
    face = torch.from_numpy(_driving_frames(2)).permute(0, 3, 1, 2).float()
    face = torch.nn.functional.interpolate(face, size=(2160, 2160), mode="bilinear", align_corners=False)
    canvas = np.zeros((2, 2160, 3840, 3), dtype=np.uint8)
    canvas[:, :, 840:3000] = face.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    _write_video(path, canvas, pix_fmt="yuv420p")


def _media(input_dir: Path, kind: str) -> str:
    """Write one driving file of the named kind into the server's input folder; returns its name."""
    frames = _driving_frames(3)
    names = {"no_face": "noise.mp4", "corrupt": "corrupt.mp4", "empty": "empty.mp4", "zero_frames": "zero.mp4",
             "two_faces": "two_faces.mp4", "single_frame": "one_frame.mp4", "grey": "grey.mkv", "rgba": "rgba.mkv",
             "odd_size": "odd_size.mkv", "4k": "four_k.mp4"}
    path = input_dir / f"{TEST_FILE_PREFIX}{names[kind]}"
    if kind == "no_face":
        _write_video(path, np.random.default_rng(0).integers(0, 256, (6, 128, 160, 3), dtype=np.uint8))
    elif kind == "corrupt":
        path.write_text("this is not a video\n" * 50)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zero_frames":
        _zero_frame_video(path)
    elif kind == "two_faces":
        _two_faces(path)
    elif kind == "single_frame":
        _write_video(path, frames[:1])
    elif kind == "grey":  # one plane (FFV1 gray)
        grey = frames.mean(axis=-1, keepdims=True).round().astype(np.uint8).repeat(3, axis=-1)
        _write_video(path, grey, codec="ffv1", pix_fmt="gray")
    elif kind == "rgba":  # colour plus a half-transparent alpha plane
        rgba = np.concatenate([frames, np.full_like(frames[..., :1], 128)], axis=-1)
        _write_video(path, rgba, image_format="rgba", codec="ffv1", pix_fmt="bgra")
    elif kind == "odd_size":  # 511x509 (FFV1 stores odd sides; H.264 4:2:0 cannot)
        _write_video(path, np.ascontiguousarray(frames[:, :509, :511]), codec="ffv1", pix_fmt="yuv444p")
    elif kind == "4k":
        _four_k(path)
    return path.name


# --- graphs -------------------------------------------------------------------------------------------------

def _extraction_graph(video: str, smoothing: float = 0.5, max_frames: int = 0) -> dict:
    return {
        "1": {"class_type": "FlashPortraitExpressionModelLoader",
              "inputs": {"expression_encoder": TINY_MODELS.expression_encoder, "face_backend": "mediapipe"}},
        "2": {"class_type": "FlashPortraitExtractExpressionsFromVideo",
              "inputs": {"video": video, "expression_model": ["1", 0], "batch_size": 4, "max_frames": max_frames,
                         "smoothing": smoothing, "target_fps": 0.0, "path": ""}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}},
    }


def _model_loader_graph(wan_model: str, flashportrait_weights: str) -> dict:
    return {
        "1": {"class_type": "FlashPortraitModelLoader",
              "inputs": {"wan_model": wan_model, "flashportrait_weights": flashportrait_weights,
                         "weight_dtype": "default"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }


def _full_graph(video: str, reference: str, seed: int, window_length: int = 51, overlap: int = 30) -> dict:
    """The smallest whole animation (5 driving frames, 1 step, 32 px), its report previewed."""
    graph = tiny_animation_prompt(video, reference, seed, emo_cfg=1.0, window_length=window_length,
                                  overlap=overlap)
    graph["11"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}}
    return graph


# --- checkpoints in the wrong slot --------------------------------------------------------------------------

def _tiny_dit(in_dim: int, image_to_video: bool) -> dict[str, torch.Tensor]:
    tensors = {"head.modulation": torch.zeros(1, 2, 8), "patch_embedding.weight": torch.zeros(8, in_dim, 1, 2, 2),
               "blocks.0.self_attn.q.weight": torch.zeros(8, 8), "blocks.0.ffn.0.weight": torch.zeros(32, 8)}
    if image_to_video:
        tensors["blocks.0.cross_attn.k_img.weight"] = torch.zeros(8, 8)
    return tensors


@pytest.fixture(scope="module")
def bad_checkpoints(comfy_server, tiny_models_dir):
    """Wrong files in the model folders the server reads; removed at the end."""
    written = {
        "lora": tiny_models_dir / "flashportrait" / f"{TEST_FILE_PREFIX}lora.safetensors",
        "sdxl": tiny_models_dir / "diffusion_models" / f"{TEST_FILE_PREFIX}sdxl.safetensors",
        "t2v": tiny_models_dir / "diffusion_models" / f"{TEST_FILE_PREFIX}wan_t2v.safetensors",
        "truncated": tiny_models_dir / "flashportrait" / f"{TEST_FILE_PREFIX}truncated.safetensors",
    }
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 8),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(8, 4)}, str(written["lora"]))
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(written["sdxl"]))
    save_file(_tiny_dit(in_dim=16, image_to_video=False), str(written["t2v"]))
    whole = (tiny_models_dir / "flashportrait" / "transformer_tiny.safetensors").read_bytes()
    written["truncated"].write_bytes(whole[: len(whole) // 3])
    yield {kind: path.name for kind, path in written.items()}
    for path in written.values():
        path.unlink(missing_ok=True)


# --- the matrix ---------------------------------------------------------------------------------------------

MEDIA_FAILURES = [
    # (media kind, exception class, words of the message)
    ("no_face", "ValueError", ["no face found in any of the 6 driving frames"]),
    ("corrupt", "VideoReadError", ["cannot decode", "corrupt.mp4"]),
    ("empty", "VideoReadError", ["empty.mp4", "is an empty file (0 bytes)"]),
    ("zero_frames", "VideoReadError", ["zero.mp4", "no video frames"]),
]
MEDIA_HANDLED = [
    # (media kind, words of the extraction report): unusual, but valid driving media
    ("two_faces", "3 frames, face found in 3"),
    ("single_frame", "1 frames, face found in 1"),
    ("grey", "3 frames, face found in 3"),
    ("rgba", "3 frames, face found in 3"),
    ("odd_size", "3 frames, face found in 3"),
    ("4k", "2 frames, face found in 2"),
]
CHECKPOINT_FAILURES = [
    # (wan_model slot, flashportrait_weights slot, the file named, words of the message)
    (TINY_MODELS.wan, TINY_MODELS.portrait_encoder, TINY_MODELS.portrait_encoder,
     ["the FlashPortrait portrait encoder, not a FlashPortrait transformer", "transformer.pt"]),
    (TINY_MODELS.wan, "lora", "lora", ["is a LoRA, not a FlashPortrait transformer"]),
    ("sdxl", TINY_MODELS.transformer, "sdxl", ["is a Stable Diffusion / SDXL UNet checkpoint, not a Wan DiT",
                                                "Wan 2.1 I2V 14B"]),
    ("t2v", TINY_MODELS.transformer, "t2v", ["is a Wan text-to-video (or other) model", "image-to-video"]),
    (TINY_MODELS.wan, "truncated", "truncated", ["not a readable safetensors file", "truncated"]),
]


def with_defaults(prompt: dict, object_info: dict) -> dict:
    """Fill every required input a graph leaves out with the node's default (inputs added to a node later)."""
    for node in prompt.values():
        required = object_info[node["class_type"]]["input"].get("required") or {}
        for name, spec in required.items():
            if name not in node["inputs"] and len(spec) > 1 and "default" in spec[1]:
                node["inputs"][name] = spec[1]["default"]
    return prompt


class Server:
    """One server for the whole matrix; a cheap good graph after every bad one proves it still works."""

    def __init__(self, handle, object_info: dict, good_video: str):
        self.handle = handle
        self.object_info = object_info
        self.good_video = good_video
        self.good_runs = 0

    def run(self, prompt: dict) -> dict:
        return comfy_client.run_prompt(self.handle.url, with_defaults(prompt, self.object_info), timeout=300,
                                       is_alive=self.handle.is_running)

    def failure(self, prompt: dict) -> dict:
        """The execution_error of a prompt that must fail."""
        with pytest.raises(comfy_client.ExecutionFailed) as raised:
            self.run(prompt)
        messages = raised.value.history_entry["status"]["messages"]
        return next(data for kind, data in messages if kind == "execution_error")

    def assert_healthy(self) -> None:
        # A new smoothing value each time: ComfyUI's cache cannot answer, the extraction really runs.
        self.good_runs += 1
        entry = self.run(_extraction_graph(self.good_video, smoothing=0.01 * self.good_runs, max_frames=2))
        assert "".join(entry["outputs"]["3"]["text"]).startswith(f"{self.good_video}: 2 frames, face found in 2")


@pytest.fixture(scope="module")
def server(comfy_server, comfy_object_info):
    good = f"{TEST_FILE_PREFIX}good.mp4"
    (comfy_server.input_dir / good).write_bytes(DRIVING.read_bytes())
    (comfy_server.input_dir / REFERENCE.name).write_bytes(REFERENCE.read_bytes())
    return Server(comfy_server, comfy_object_info, good)


def _type_name(error: dict) -> str:
    return error["exception_type"].rsplit(".", 1)[-1]


@pytest.mark.parametrize("kind, exception_type, words", MEDIA_FAILURES, ids=[c[0] for c in MEDIA_FAILURES])
def test_bad_driving_media_fails_naming_the_input(server, kind, exception_type, words):
    video = _media(server.handle.input_dir, kind)
    error = server.failure(_extraction_graph(video))
    assert error["node_type"] == "FlashPortraitExtractExpressionsFromVideo"
    assert _type_name(error) == exception_type
    for word in words:
        assert word in error["exception_message"]
    assert "driving" in error["exception_message"] or video in error["exception_message"]
    server.assert_healthy()


@pytest.mark.parametrize("kind, report", MEDIA_HANDLED, ids=[c[0] for c in MEDIA_HANDLED])
def test_unusual_driving_media_is_handled(server, kind, report):
    video = _media(server.handle.input_dir, kind)
    entry = server.run(_extraction_graph(video))
    assert "".join(entry["outputs"]["3"]["text"]).startswith(f"{video}: {report}")
    server.assert_healthy()


@pytest.mark.parametrize("wan_model, weights, named, words", CHECKPOINT_FAILURES,
                         ids=["portrait_encoder_as_transformer", "lora_as_transformer", "sdxl_as_wan", "t2v_as_wan",
                              "truncated_transformer"])
def test_wrong_checkpoints_fail_naming_the_file(server, bad_checkpoints, wan_model, weights, named, words):
    wan_model, weights, named = (bad_checkpoints.get(name, name) for name in (wan_model, weights, named))
    error = server.failure(_model_loader_graph(wan_model, weights))
    assert error["node_type"] == "FlashPortraitModelLoader"
    assert _type_name(error) == "CheckpointError"
    assert named in error["exception_message"]
    for word in words:
        assert word in error["exception_message"]
    server.assert_healthy()


def test_overlap_not_below_the_window_is_refused_before_running(server):
    with pytest.raises(comfy_client.PromptRejected) as raised:
        graph = _full_graph(server.good_video, REFERENCE.name, seed=1, window_length=4, overlap=4)
        comfy_client.queue_prompt(server.handle.url, with_defaults(graph, server.object_info))
    assert "overlap (4) must be smaller than window_length (4): lower overlap to at most 3" in str(raised.value)
    server.assert_healthy()


def test_window_longer_than_the_video_is_clipped_and_reported(server):
    entry = server.run(_full_graph(server.good_video, REFERENCE.name, seed=2, window_length=51, overlap=30))
    report = "".join(entry["outputs"]["11"]["text"])
    assert report.startswith("1 window(s) x 1 steps")
    assert "window_length 51 is longer than the video (2 latent frames): one window of 2 latent frames" in report
    server.assert_healthy()
