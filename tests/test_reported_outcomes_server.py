"""Nothing reported that did not happen, through one real ComfyUI server: every bad graph below ends with what the
user must see (an error naming the input and the fix, a report line, a file with the right frames), and a good
graph runs right after it on the same server.

Covered: a result too short to write; widget values ComfyUI rejects; an interrupt while a large video decodes;
messages for an empty checkpoint, a non-media or folder audio file, long, empty and hidden filename prefixes;
a variable-frame-rate video; the trim to 4k + 1; file inputs outside ComfyUI's folders and annotated names; the
driving video's own frame rate carried to the file.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import av
import numpy as np
import pytest

from scripts import comfy_client
from scripts.workflow_prep import TINY_MODELS, tiny_animation_prompt
from test_bad_inputs_server import with_defaults
from test_expression_video import write_variable_rate_video

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DRIVING_25 = DATA / "driving" / "lp_d0.mp4"  # 25 fps, silent
DRIVING_30 = DATA / "driving" / "lp_d18.mp4"  # 30 fps, AAC sound
REFERENCE = DATA / "reference" / "fp_case1.png"
PREFIX = "zz_outcome_"  # files this module writes into the server's folders

pytestmark = pytest.mark.graph


# --- graphs -------------------------------------------------------------------------------------------------

def _animation(video: str, frames: int, seed: int, drop_reference_frame: bool = True,
               filename_prefix: str = "video/outcome") -> dict:
    """The tiny animation of the first ``frames`` driving frames at the video's own rate, decoded to a file."""
    graph = tiny_animation_prompt(video, REFERENCE.name, seed)
    extraction = graph["6"]["inputs"]
    extraction["max_frames"] = frames
    del extraction["target_fps"]  # the node's default: the video's own rate
    graph["11"] = {"class_type": "FlashPortraitDecodeToVideo",
                   "inputs": {"latent": ["10", 0], "vae": ["4", 0], "fps": ["6", 1], "filename_prefix": filename_prefix,
                              "crf": 19, "drop_reference_frame": drop_reference_frame}}
    graph["12"] = {"class_type": "PreviewAny", "inputs": {"source": ["7", 1]}}  # the Emotion Conditioning report
    return graph


def _decode(width: int = 32, height: int = 32, length: int = 5, **decode_inputs) -> dict:
    """Empty Wan latents of ``length`` video frames straight into the decoder (no sampler)."""
    inputs = {"latent": ["1", 0], "vae": ["2", 0], "fps": 25.0, "filename_prefix": "video/outcome_decode",
              "crf": 19, "drop_reference_frame": True}
    inputs.update(decode_inputs)
    return {
        "1": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": width, "height": height, "length": length, "batch_size": 1}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": TINY_MODELS.vae}},
        "3": {"class_type": "FlashPortraitDecodeToVideo", "inputs": inputs},
    }


def _with_audio_file(graph: dict, name: str) -> dict:
    """``audio_file`` is a socket in the UI: fed by a string node, as a user wires it."""
    graph["9"] = {"class_type": "PrimitiveString", "inputs": {"value": name}}
    graph["3"]["inputs"]["audio_file"] = ["9", 0]
    return graph


def _extraction(video: str = "", path: str = "", max_frames: int = 3, smoothing: float = 0.5) -> dict:
    return {
        "1": {"class_type": "FlashPortraitExpressionModelLoader",
              "inputs": {"expression_encoder": TINY_MODELS.expression_encoder, "face_backend": "mediapipe"}},
        "2": {"class_type": "FlashPortraitExtractExpressionsFromVideo",
              "inputs": {"video": video, "expression_model": ["1", 0], "batch_size": 4, "max_frames": max_frames,
                         "smoothing": smoothing, "path": path}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}},
    }


# --- one server ---------------------------------------------------------------------------------------------

class Server:
    def __init__(self, handle, object_info: dict):
        self.handle, self.object_info, self.good_runs = handle, object_info, 0

    @property
    def url(self) -> str:
        return self.handle.url

    def prompt(self, graph: dict) -> dict:
        return with_defaults(graph, self.object_info)

    def run(self, graph: dict, timeout: float = 600) -> dict:
        return comfy_client.run_prompt(self.url, self.prompt(graph), timeout=timeout, is_alive=self.handle.is_running)

    def failure(self, graph: dict) -> dict:
        with pytest.raises(comfy_client.ExecutionFailed) as raised:
            self.run(graph)
        messages = raised.value.history_entry["status"]["messages"]
        return next(data for kind, data in messages if kind == "execution_error")

    def rejection(self, graph: dict) -> str:
        with pytest.raises(comfy_client.PromptRejected) as raised:
            comfy_client.queue_prompt(self.url, self.prompt(graph))
        return str(raised.value)

    def text(self, entry: dict, node: str) -> str:
        return "".join(entry["outputs"][node]["text"])

    def output_file(self, entry: dict, node: str) -> Path:
        [record] = entry["outputs"][node]["images"]
        return self.handle.output_dir / record["subfolder"] / record["filename"]

    def assert_healthy(self) -> None:
        """A cheap good graph: a decode straight to a file, checked on disk."""
        self.good_runs += 1
        entry = self.run(_decode(length=9, filename_prefix=f"video/{PREFIX}healthy"))
        path = self.output_file(entry, "3")
        assert path.is_file() and _frames(path) == (8, 25.0)


def _frames(path: Path) -> tuple[int, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), float(stream.average_rate)


@pytest.fixture(scope="module")
def server(comfy_server, comfy_object_info):
    for source in (DRIVING_25, DRIVING_30, REFERENCE):
        shutil.copy(source, comfy_server.input_dir / source.name)
    return Server(comfy_server, comfy_object_info)


# --- 1. a result with nothing to write ----------------------------------------------------------------------

def test_too_short_a_video_is_an_error_and_no_file_is_reported(server):
    before = set(server.handle.output_dir.rglob("*.mp4"))
    error = server.failure(_animation(DRIVING_30.name, frames=3, seed=11))
    assert error["node_type"] == "FlashPortraitDecodeToVideo"
    assert "nothing to write: 1 latent frame is the reference frame alone, and drop_reference_frame leaves it " \
           "out. Give at least 5 driving frames" in error["exception_message"]
    assert set(server.handle.output_dir.rglob("*.mp4")) == before
    # Good graph: 5 frames of the 30 fps video give 4 frames at 30 fps, in a file that exists.
    entry = server.run(_animation(DRIVING_30.name, frames=5, seed=11))
    path = server.output_file(entry, "11")
    assert path.is_file() and _frames(path) == (4, 30.0)
    assert server.text(entry, "11") == f"wrote {path}: 4 frames at 30 fps, 32x32"
    assert server.text(entry, "12") == "5 driving frames -> 2 latent frames"


# --- 2. values ComfyUI rejects ------------------------------------------------------------------------------

REJECTED = [
    # (node, input, value, ComfyUI's message)
    ("10", "seed", -1, "Value -1 smaller than min of 0"),
    ("10", "seed", 2 ** 64, f"Value {2 ** 64} bigger than max of {2 ** 64 - 1}"),
    ("10", "shift", 0.0, "Value 0.0 smaller than min of 0.1"),
    ("10", "max_side", 8, "Value 8 smaller than min of 16"),
    ("7", "emo_cfg", 0.0, "Value 0.0 smaller than min of 1.0"),
    ("7", "ip_scale", 5.0, "Value 5.0 bigger than max of 4.0"),
    ("11", "crf", 52, "Value 52 bigger than max of 51"),
    # Inputs that a node's own validation names: the node checks their range and options itself, in ComfyUI's words.
    ("10", "target_speedup", 50.0,
     "Custom validation failed for node: target_speedup: value 50.0 bigger than max of 10.0"),
    ("10", "schedule", "karras", "Custom validation failed for node: schedule: 'karras' not in ['published', 'simple']"),
]


@pytest.mark.parametrize("node, name, value, message", REJECTED, ids=[f"{r[1]}={r[2]}" for r in REJECTED])
def test_rejected_values_fail_naming_node_input_and_message(server, node, name, value, message):
    graph = _animation(DRIVING_25.name, frames=5, seed=1)
    graph[node]["inputs"][name] = value
    text = server.rejection(graph)  # refused (400), or accepted with the rest skipped and then cancelled
    assert f"({graph[node]['class_type']}) input '{name}': {message}" in text
    server.assert_healthy()


def test_fps_zero_is_rejected(server):
    text = server.rejection(_decode(fps=0.0))
    assert "node 3 (FlashPortraitDecodeToVideo) input 'fps': Value 0.0 smaller than min of 1.0" in text
    server.assert_healthy()


# --- 5. an interrupt while a large video decodes ------------------------------------------------------------

def test_interrupt_during_a_2048_decode_lands_within_seconds(server):
    prompt_id = comfy_client.queue_prompt(server.url, server.prompt(
        _decode(width=2048, height=2048, length=9, filename_prefix=f"video/{PREFIX}large")))
    # Wait until the decoder runs (the empty latents and the VAE loader take a moment), then interrupt.
    deadline = time.monotonic() + 120
    while comfy_client._request(f"{server.url}/queue")[1]["queue_running"] == [] and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(8)
    asked = time.monotonic()
    comfy_client.interrupt(server.url)
    with pytest.raises(comfy_client.ExecutionFailed, match="interrupted at node 3"):
        comfy_client.wait_for_result(server.url, prompt_id, timeout=300, poll_interval=0.1)
    latency = time.monotonic() - asked
    print(f"interrupt during a 2048x2048 decode took {latency:.2f} s")
    assert latency < 5.0
    assert not list(server.handle.output_dir.rglob(f"{PREFIX}large*"))  # the partial file is removed
    server.assert_healthy()


# --- 6. messages that name the input, what is wrong and the fix ----------------------------------------------

@pytest.fixture(scope="module")
def empty_checkpoint(comfy_server, tiny_models_dir):
    path = tiny_models_dir / "flashportrait" / f"{PREFIX}empty.pt"
    path.write_bytes(b"")
    yield path.name
    path.unlink(missing_ok=True)


def test_empty_checkpoint_is_named(server, empty_checkpoint):
    graph = {"1": {"class_type": "FlashPortraitPortraitEncoderLoader",
                   "inputs": {"portrait_encoder": empty_checkpoint}},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    error = server.failure(graph)
    assert f"{empty_checkpoint} is an empty file (0 bytes): its download or copy did not finish; download it " \
           f"again" in error["exception_message"]
    server.assert_healthy()


@pytest.mark.parametrize("kind", ["not_media", "folder", "outside", "dotdot"])
def test_bad_audio_files_are_named(server, kind):
    input_dir = server.handle.input_dir
    if kind == "not_media":
        (input_dir / f"{PREFIX}notes.mp3").write_text("these are notes, not sound\n" * 40)
        name, words = f"{PREFIX}notes.mp3", [f"audio_file '{PREFIX}notes.mp3'", "is not a video or audio file that "
                                             "can be read (Invalid data found when processing input)",
                                             "give a media file with sound"]
    elif kind == "folder":
        (input_dir / f"{PREFIX}clips").mkdir(exist_ok=True)
        name, words = f"{PREFIX}clips", [f"audio_file '{PREFIX}clips' is a folder", "not a file; give the name of"]
    elif kind == "outside":
        name, words = str(DRIVING_30), [f"audio_file '{DRIVING_30}' is outside ComfyUI's input folder",
                                        "FLASHPORTRAIT_ALLOW_OUTSIDE_PATHS=1"]
    else:
        name, words = f"../{DRIVING_30.name}", [f"audio_file '../{DRIVING_30.name}' is outside ComfyUI's input folder"]
    error = server.failure(_with_audio_file(_decode(filename_prefix=f"video/{PREFIX}audio"), name))
    for word in words:
        assert word in error["exception_message"]
    assert not list(server.handle.output_dir.rglob(f"{PREFIX}audio*"))
    server.assert_healthy()


def test_annotated_audio_file_is_accepted(server):
    entry = server.run(_with_audio_file(_decode(length=9), f"{DRIVING_30.name} [input]"))
    with av.open(str(server.output_file(entry, "3"))) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]


@pytest.mark.parametrize("prefix, words", [
    ("", "filename_prefix is empty"),
    (".hidden", "would write a hidden file ('.hidden_00000_.mp4')"),
    ("video/", "ends in a folder and names no file"),
    ("p" * 300, "is too long: a file or folder name takes at most 255 bytes"),
    ("../../outside", "leads outside ComfyUI's output folder"),
], ids=["empty", "hidden", "folder", "300_characters", "outside"])
def test_bad_filename_prefixes_are_refused_before_running(server, prefix, words):
    text = server.rejection(_decode(filename_prefix=prefix))
    assert "(FlashPortraitDecodeToVideo) input 'filename_prefix': Custom validation failed for node" in text
    assert words in text and "give a name such as 'video/FlashPortrait'" in text
    server.assert_healthy()


# --- 7. approximations said in the report -------------------------------------------------------------------

def test_variable_frame_rate_is_reported(server):
    name = f"{PREFIX}vfr.mp4"
    with av.open(str(DRIVING_25)) as container:  # a real face, re-timed: 8 frames 40 ms apart, then 20 ms
        faces = np.stack([f.to_ndarray(format="rgb24")[::4, ::4] for _, f in zip(range(16), container.decode(video=0))])
    write_variable_rate_video(server.handle.input_dir / name, [40] * 8 + [20] * 7, faces)
    entry = server.run(_extraction(name, max_frames=0))
    report = server.text(entry, "3")
    assert report.startswith(f"{name}: 16 frames, face found in 16")
    assert "variable frame rate: frames 20-40 ms apart; they are used in order at the average" in report
    good = server.run(_extraction(DRIVING_25.name, max_frames=2))
    assert "variable frame rate" not in server.text(good, "3")


def test_trim_to_4k_plus_1_is_in_the_report(server):
    graph = _extraction(DRIVING_25.name, max_frames=7)
    graph["4"] = {"class_type": "FlashPortraitPortraitEncoderLoader",
                  "inputs": {"portrait_encoder": TINY_MODELS.portrait_encoder}}
    graph["5"] = {"class_type": "FlashPortraitEmotionConditioning",
                  "inputs": {"expressions": ["2", 0], "portrait_encoder": ["4", 0], "ip_scale": 1.0, "emo_cfg": 4.0,
                             "text_cfg": 1.0}}
    graph["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}}
    entry = server.run(graph)
    assert server.text(entry, "6") == ("5 driving frames -> 2 latent frames; 7 driving frames trimmed to 5 (4k + 1, "
                                       "as the Wan VAE packs 4 frames per latent frame plus the first)")
    assert entry["outputs"]["5"]["text"] == entry["outputs"]["6"]["text"]  # on the node itself too
    server.assert_healthy()


# --- file inputs inside ComfyUI's folders -------------------------------------------------------------------

@pytest.mark.parametrize("video, path", [
    (DRIVING_25.name, str(DRIVING_25)),
    (DRIVING_25.name, f"../input/../../{DRIVING_25.name}"),
    (str(DRIVING_25), ""),
], ids=["absolute_path", "dotdot_path", "absolute_video"])
def test_video_outside_the_input_folder_is_refused(server, video, path):
    text = server.rejection(_extraction(video, path))
    input_name, typed = ("path", path) if path else ("video", video)
    assert f"input '{input_name}': Custom validation failed for node: {input_name} '{typed}' is outside " \
           f"ComfyUI's input folder ({server.handle.input_dir.resolve()})" in text
    assert "FLASHPORTRAIT_ALLOW_OUTSIDE_PATHS=1" in text
    server.assert_healthy()


def test_annotated_and_nested_names_are_accepted(server):
    nested = server.handle.input_dir / f"{PREFIX}clips"
    nested.mkdir(exist_ok=True)
    shutil.copy(DRIVING_25, nested / "talk.mp4")
    shutil.copy(DRIVING_25, server.handle.output_dir / f"{PREFIX}made_earlier.mp4")
    for video, path, shown in [(f"{DRIVING_25.name} [input]", "", DRIVING_25.name),
                               (DRIVING_25.name, f"{PREFIX}clips/talk.mp4", "talk.mp4"),
                               (DRIVING_25.name, f"{PREFIX}made_earlier.mp4 [output]", f"{PREFIX}made_earlier.mp4")]:
        entry = server.run(_extraction(video, path, max_frames=2, smoothing=0.31))
        assert server.text(entry, "3").startswith(f"{shown}: 2 frames, face found in 2")
