"""Through a real ComfyUI server: a loader reads exactly the file chosen in it, even when a same-stem file in
another format (X.safetensors beside X.pt) sits in the folder, and its report names what it read. A broken twin
changes nothing for the file chosen, and choosing the broken twin itself names that file. A whole animation runs
on the same server afterwards."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scripts import comfy_client
from scripts.workflow_prep import TINY_MODELS, tiny_animation_prompt
from test_bad_inputs_server import with_defaults

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PREFIX = "zz_chosen_"

pytestmark = pytest.mark.graph


@pytest.fixture(scope="module")
def twins(comfy_server, tiny_models_dir):
    """X.pt files (good copies of the tiny ones) with a broken X.safetensors beside each; removed at the end."""
    folder = tiny_models_dir / "flashportrait"
    written = []
    for stem, source in (("transformer", TINY_MODELS.transformer), ("portrait_encoder", TINY_MODELS.portrait_encoder)):
        good = folder / f"{PREFIX}{stem}.pt"
        if source.endswith(".pt"):
            shutil.copy(folder / source, good)
        else:  # the tiny portrait encoder is safetensors: write the same tensors as a torch pickle
            import torch
            from safetensors.torch import load_file
            torch.save(load_file(str(folder / source)), good)
        broken = folder / f"{PREFIX}{stem}.safetensors"
        broken.write_bytes((folder / "transformer_tiny.safetensors").read_bytes()[:5000])
        written += [good, broken]
    yield {path.name: path for path in written}
    for path in written:
        path.unlink(missing_ok=True)


def _run(server, prompt: dict) -> dict:
    return comfy_client.run_prompt(server.url, prompt, timeout=600, is_alive=server.is_running)


def _failure(server, prompt: dict) -> dict:
    with pytest.raises(comfy_client.ExecutionFailed) as raised:
        _run(server, prompt)
    return next(data for kind, data in raised.value.history_entry["status"]["messages"] if kind == "execution_error")


def test_the_file_chosen_is_the_file_read(comfy_server, comfy_object_info, twins):
    model_graph = {
        "1": {"class_type": "FlashPortraitModelLoader",
              "inputs": {"wan_model": TINY_MODELS.wan, "flashportrait_weights": f"{PREFIX}transformer.pt",
                         "weight_dtype": "default"}},
        "2": {"class_type": "FlashPortraitPortraitEncoderLoader",
              "inputs": {"portrait_encoder": f"{PREFIX}portrait_encoder.pt"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    entry = _run(comfy_server, model_graph)
    model_report = "".join(entry["outputs"]["1"]["text"])
    assert model_report.startswith(f"{PREFIX}transformer.pt laid over {TINY_MODELS.wan}: ")
    assert f"{PREFIX}transformer.pt: torch zip, memory-mapped" in model_report
    assert ".safetensors" not in model_report.replace(TINY_MODELS.wan, "")
    assert "".join(entry["outputs"]["2"]["text"]).startswith(f"{PREFIX}portrait_encoder.pt: portrait encoder, 24 "
                                                             f"tokens of 64 per frame")

    # The broken twin chosen: the error names it, and only it.
    model_graph["1"]["inputs"]["flashportrait_weights"] = f"{PREFIX}transformer.safetensors"
    error = _failure(comfy_server, model_graph)
    assert error["node_type"] == "FlashPortraitModelLoader"
    assert error["exception_message"].startswith(f"{PREFIX}transformer.safetensors is not a readable safetensors "
                                                 f"file")
    assert f"{PREFIX}transformer.pt" not in error["exception_message"]

    # A whole animation on the same server, its model read from the .pt beside the broken twin.
    (comfy_server.input_dir / f"{PREFIX}driving.mp4").write_bytes((DATA / "driving" / "lp_d0.mp4").read_bytes())
    (comfy_server.input_dir / f"{PREFIX}reference.png").write_bytes((DATA / "reference" / "fp_case1.png").read_bytes())
    graph = tiny_animation_prompt(f"{PREFIX}driving.mp4", f"{PREFIX}reference.png", seed=3)
    graph["1"]["inputs"]["flashportrait_weights"] = f"{PREFIX}transformer.pt"
    graph["2"]["inputs"]["portrait_encoder"] = f"{PREFIX}portrait_encoder.pt"
    graph["11"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}}
    entry = _run(comfy_server, with_defaults(graph, comfy_object_info))
    assert "".join(entry["outputs"]["11"]["text"]).startswith("1 window(s) x 1 steps")
