"""The UI-to-API converter against the real /object_info of ComfyUI 0.3.75, and the client against its server."""
from __future__ import annotations

import copy
import time

import numpy as np
import pytest
from PIL import Image

from scripts import comfy_client
from scripts.comfy_client import WorkflowError, ui_to_api

pytestmark = pytest.mark.graph


def _widget_socket(name: str, type_: str, link: int | None = None) -> dict:
    """A widget's input socket as the front end (1.16 and later) saves it."""
    return {"name": name, "type": type_, "widget": {"name": name}, "link": link}


def _socket(name: str, type_: str, link: int | None) -> dict:
    return {"name": name, "type": type_, "link": link}


def _out(name: str, type_: str, links: list[int]) -> dict:
    return {"name": name, "type": type_, "links": links}


# A text-to-image graph of core nodes, saved the way the front end saves it, with every UI-only
# feature the converter handles: a KSampler whose seed is fed by an Int node and whose steps by a
# front-end PrimitiveNode, a Reroute, a Note, a bypassed latent upscale, and a muted invert node
# that feeds a second SaveImage.
SAMPLER_WORKFLOW = {
    "last_node_id": 15,
    "last_link_id": 16,
    "nodes": [
        {"id": 1, "type": "CheckpointLoaderSimple", "mode": 0,
         "inputs": [_widget_socket("ckpt_name", "COMBO")],
         "outputs": [_out("MODEL", "MODEL", [1]), _out("CLIP", "CLIP", [2, 3]), _out("VAE", "VAE", [10])],
         "widgets_values": ["tiny.safetensors"]},
        {"id": 2, "type": "CLIPTextEncode", "mode": 0, "title": "Positive",
         "inputs": [_widget_socket("text", "STRING"), _socket("clip", "CLIP", 2)],
         "outputs": [_out("CONDITIONING", "CONDITIONING", [6])],
         "widgets_values": ["a portrait, smiling"]},
        {"id": 3, "type": "CLIPTextEncode", "mode": 0,
         "inputs": [_widget_socket("text", "STRING"), _socket("clip", "CLIP", 3)],
         "outputs": [_out("CONDITIONING", "CONDITIONING", [7])],
         "widgets_values": ["blurry"]},
        {"id": 4, "type": "EmptyLatentImage", "mode": 0,
         "inputs": [_widget_socket("width", "INT"), _widget_socket("height", "INT"),
                    _widget_socket("batch_size", "INT")],
         "outputs": [_out("LATENT", "LATENT", [4])],
         "widgets_values": [64, 48, 1]},
        {"id": 5, "type": "LatentUpscale", "mode": 4,
         "inputs": [_socket("samples", "LATENT", 4), _widget_socket("upscale_method", "COMBO"),
                    _widget_socket("width", "INT"), _widget_socket("height", "INT"),
                    _widget_socket("crop", "COMBO")],
         "outputs": [_out("LATENT", "LATENT", [5])],
         "widgets_values": ["nearest-exact", 128, 96, "disabled"]},
        {"id": 6, "type": "KSampler", "mode": 0,
         "inputs": [_socket("model", "MODEL", 1), _widget_socket("seed", "INT", 8),
                    _widget_socket("steps", "INT", 9), _widget_socket("cfg", "FLOAT"),
                    _widget_socket("sampler_name", "COMBO"), _widget_socket("scheduler", "COMBO"),
                    _socket("positive", "CONDITIONING", 6), _socket("negative", "CONDITIONING", 7),
                    _socket("latent_image", "LATENT", 5), _widget_socket("denoise", "FLOAT")],
         "outputs": [_out("LATENT", "LATENT", [12])],
         # seed 42 + its control value; steps 20 is overridden by the PrimitiveNode's 12.
         "widgets_values": [42, "randomize", 20, 7.5, "euler", "normal", 1.0]},
        {"id": 7, "type": "Reroute", "mode": 0,
         "inputs": [{"name": "", "type": "*", "link": 10}],
         "outputs": [_out("", "VAE", [11])],
         "properties": {"showOutputText": False, "horizontal": False}},
        {"id": 8, "type": "VAEDecode", "mode": 0,
         "inputs": [_socket("samples", "LATENT", 12), _socket("vae", "VAE", 11)],
         "outputs": [_out("IMAGE", "IMAGE", [13, 14])]},
        {"id": 9, "type": "SaveImage", "mode": 0,
         "inputs": [_socket("images", "IMAGE", 13), _widget_socket("filename_prefix", "STRING")],
         "outputs": [],
         "widgets_values": ["portrait"]},
        {"id": 10, "type": "Note", "mode": 0, "inputs": [], "outputs": [],
         "widgets_values": ["Seed comes from the Int node."]},
        {"id": 11, "type": "PrimitiveInt", "mode": 0,
         "inputs": [_widget_socket("value", "INT")],
         "outputs": [_out("INT", "INT", [8])],
         "widgets_values": [7, "fixed"]},
        {"id": 12, "type": "PrimitiveNode", "mode": 0, "title": "steps",
         "inputs": [],
         "outputs": [{"name": "INT", "type": "INT", "links": [9], "widget": {"name": "steps"}}],
         "widgets_values": [12, "fixed"]},
        {"id": 14, "type": "ImageInvert", "mode": 2,
         "inputs": [_socket("image", "IMAGE", 14)],
         "outputs": [_out("IMAGE", "IMAGE", [15])]},
        {"id": 15, "type": "SaveImage", "mode": 0,
         "inputs": [_socket("images", "IMAGE", 15), _widget_socket("filename_prefix", "STRING")],
         "outputs": [],
         "widgets_values": ["inverted"]},
    ],
    "links": [
        [1, 1, 0, 6, 0, "MODEL"],
        [2, 1, 1, 2, 1, "CLIP"],
        [3, 1, 1, 3, 1, "CLIP"],
        [4, 4, 0, 5, 0, "LATENT"],
        [5, 5, 0, 6, 8, "LATENT"],
        [6, 2, 0, 6, 6, "CONDITIONING"],
        [7, 3, 0, 6, 7, "CONDITIONING"],
        [8, 11, 0, 6, 1, "INT"],
        [9, 12, 0, 6, 2, "INT"],
        [10, 1, 2, 7, 0, "*"],
        [11, 7, 0, 8, 1, "VAE"],
        [12, 6, 0, 8, 0, "LATENT"],
        [13, 8, 0, 9, 0, "IMAGE"],
        [14, 8, 0, 14, 0, "IMAGE"],
        [15, 14, 0, 15, 0, "IMAGE"],
    ],
    "groups": [],
    "config": {},
    "extra": {},
    "version": 0.4,
}

SAMPLER_PROMPT = {
    "1": {"inputs": {"ckpt_name": "tiny.safetensors"}, "class_type": "CheckpointLoaderSimple",
          "_meta": {"title": "Load Checkpoint"}},
    "2": {"inputs": {"text": "a portrait, smiling", "clip": ["1", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "Positive"}},
    "3": {"inputs": {"text": "blurry", "clip": ["1", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "CLIP Text Encode (Prompt)"}},
    "4": {"inputs": {"width": 64, "height": 48, "batch_size": 1}, "class_type": "EmptyLatentImage",
          "_meta": {"title": "Empty Latent Image"}},
    "6": {"inputs": {"seed": ["11", 0], "steps": 12, "cfg": 7.5, "sampler_name": "euler",
                     "scheduler": "normal", "denoise": 1.0, "model": ["1", 0], "positive": ["2", 0],
                     "negative": ["3", 0], "latent_image": ["4", 0]},
          "class_type": "KSampler", "_meta": {"title": "KSampler"}},
    "8": {"inputs": {"samples": ["6", 0], "vae": ["1", 2]}, "class_type": "VAEDecode",
          "_meta": {"title": "VAE Decode"}},
    "9": {"inputs": {"filename_prefix": "portrait", "images": ["8", 0]}, "class_type": "SaveImage",
          "_meta": {"title": "Save Image"}},
    "11": {"inputs": {"value": 7}, "class_type": "PrimitiveInt", "_meta": {"title": "Int"}},
    "15": {"inputs": {"filename_prefix": "inverted"}, "class_type": "SaveImage",
           "_meta": {"title": "Save Image"}},
}

# A graph that runs in a second on the CPU: a solid-colour image, through a Reroute and a bypassed
# flip, inverted and saved. Links in the object format of newer front ends.
INVERT_COLOR = 0x336699
INVERT_WORKFLOW = {
    "nodes": [
        {"id": 1, "type": "EmptyImage", "mode": 0,
         "inputs": [], "outputs": [_out("IMAGE", "IMAGE", [1])],
         "widgets_values": [8, 4, 1, INVERT_COLOR]},
        {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}],
         "outputs": [_out("", "IMAGE", [2])]},
        {"id": 3, "type": "ImageFlip", "mode": 4, "inputs": [_socket("image", "IMAGE", 2)],
         "outputs": [_out("IMAGE", "IMAGE", [3])], "widgets_values": ["x-axis: vertically"]},
        {"id": 4, "type": "ImageInvert", "mode": 0, "inputs": [_socket("image", "IMAGE", 3)],
         "outputs": [_out("IMAGE", "IMAGE", [4])]},
        {"id": 5, "type": "SaveImage", "mode": 0, "inputs": [_socket("images", "IMAGE", 4)],
         "outputs": [], "widgets_values": ["client_invert"]},
        {"id": 6, "type": "MarkdownNote", "mode": 0, "inputs": [], "outputs": [],
         "widgets_values": ["# Inverts a solid colour"]},
    ],
    "links": [
        {"id": 1, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "IMAGE"},
        {"id": 2, "origin_id": 2, "origin_slot": 0, "target_id": 3, "target_slot": 0, "type": "IMAGE"},
        {"id": 3, "origin_id": 3, "origin_slot": 0, "target_id": 4, "target_slot": 0, "type": "IMAGE"},
        {"id": 4, "origin_id": 4, "origin_slot": 0, "target_id": 5, "target_slot": 0, "type": "IMAGE"},
    ],
    "version": 1,
}


def test_sampler_workflow_converts_to_exact_api_prompt(comfy_object_info):
    assert ui_to_api(SAMPLER_WORKFLOW, comfy_object_info) == SAMPLER_PROMPT


def test_seed_control_value_is_skipped_when_seed_is_a_widget(comfy_object_info):
    workflow = copy.deepcopy(SAMPLER_WORKFLOW)
    sampler = next(node for node in workflow["nodes"] if node["id"] == 6)
    sampler["inputs"][1]["link"] = None  # seed back to its widget value
    sampler["inputs"][2]["link"] = None
    workflow["links"] = [link for link in workflow["links"] if link[0] not in (8, 9)]

    inputs = ui_to_api(workflow, comfy_object_info)["6"]["inputs"]

    assert (inputs["seed"], inputs["steps"], inputs["cfg"], inputs["sampler_name"]) == (42, 20, 7.5, "euler")
    assert inputs["denoise"] == 1.0


def test_widget_layout_follows_object_info_including_v3_nodes(comfy_object_info):
    assert comfy_client.widget_layout(comfy_object_info["KSampler"]) == [
        ("seed", 1), ("steps", 0), ("cfg", 0), ("sampler_name", 0), ("scheduler", 0), ("denoise", 0)]
    # V3 schema: control_after_generate is explicit, COMBO is ["COMBO", {"options": [...]}].
    assert comfy_client.widget_layout(comfy_object_info["RandomNoise"]) == [("noise_seed", 1)]
    assert comfy_client.widget_layout(comfy_object_info["PrimitiveInt"]) == [("value", 1)]
    assert comfy_client.widget_layout(comfy_object_info["RegexExtract"]) == [
        ("string", 0), ("regex_pattern", 0), ("mode", 0), ("case_insensitive", 0), ("multiline", 0),
        ("dotall", 0), ("group_index", 0)]
    # Sockets only (no widgets) for optional and model-type inputs.
    assert comfy_client.widget_layout(comfy_object_info["WanImageToVideo"]) == [
        ("width", 0), ("height", 0), ("length", 0), ("batch_size", 0)]


def test_upload_button_value_after_last_widget_is_ignored(comfy_object_info):
    workflow = {"nodes": [{"id": 3, "type": "LoadImage", "mode": 0, "inputs": [],
                           "outputs": [_out("IMAGE", "IMAGE", []), _out("MASK", "MASK", [])],
                           "widgets_values": ["portrait.png", "image"]}], "links": []}
    assert ui_to_api(workflow, comfy_object_info) == {
        "3": {"inputs": {"image": "portrait.png"}, "class_type": "LoadImage", "_meta": {"title": "Load Image"}}}


def test_dict_widgets_values_are_read_by_name(comfy_object_info):
    workflow = {"nodes": [{"id": 1, "type": "EmptyImage", "mode": 0, "inputs": [], "outputs": [],
                           "widgets_values": {"width": 16, "height": 8, "batch_size": 2, "color": 255,
                                              "videopreview": {"hidden": False}}}], "links": []}
    assert ui_to_api(workflow, comfy_object_info)["1"]["inputs"] == {
        "width": 16, "height": 8, "batch_size": 2, "color": 255}


def test_bypass_prefers_same_slot_then_matching_type(comfy_object_info):
    # ImageBatch bypassed: its output IMAGE passes input slot 0 (image1), not image2.
    workflow = {
        "nodes": [
            {"id": 1, "type": "EmptyImage", "mode": 0, "outputs": [_out("IMAGE", "IMAGE", [1])],
             "widgets_values": [4, 4, 1, 0]},
            {"id": 2, "type": "EmptyImage", "mode": 0, "outputs": [_out("IMAGE", "IMAGE", [2])],
             "widgets_values": [4, 4, 1, 255]},
            {"id": 3, "type": "ImageBatch", "mode": 4,
             "inputs": [_socket("image1", "IMAGE", 1), _socket("image2", "IMAGE", 2)],
             "outputs": [_out("IMAGE", "IMAGE", [3])]},
            {"id": 4, "type": "ImageToMask", "mode": 4,  # IMAGE in, MASK out: nothing can pass
             "inputs": [_socket("image", "IMAGE", 3)], "outputs": [_out("MASK", "MASK", [4])],
             "widgets_values": ["red"]},
            {"id": 5, "type": "MaskToImage", "mode": 0, "inputs": [_socket("mask", "MASK", 4)],
             "outputs": [_out("IMAGE", "IMAGE", [])]},
            {"id": 6, "type": "PreviewImage", "mode": 0, "inputs": [_socket("images", "IMAGE", 5)],
             "outputs": []},
        ],
        "links": [[1, 1, 0, 3, 0, "IMAGE"], [2, 2, 0, 3, 1, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"],
                  [4, 4, 0, 5, 0, "MASK"], [5, 3, 0, 6, 0, "IMAGE"]],
    }
    prompt = ui_to_api(workflow, comfy_object_info)
    assert prompt["6"]["inputs"] == {"images": ["1", 0]}
    assert prompt["5"]["inputs"] == {}
    assert sorted(prompt, key=int) == ["1", "2", "5", "6"]


def test_list_widget_values_are_wrapped(comfy_object_info):
    workflow = {"nodes": [{"id": 1, "type": "PrimitiveString", "mode": 0, "inputs": [], "outputs": [],
                           "widgets_values": [["a", "b"]]}], "links": []}
    assert ui_to_api(workflow, comfy_object_info)["1"]["inputs"] == {"value": {"__value__": ["a", "b"]}}


def test_conversion_errors_name_the_node(comfy_object_info):
    unknown = {"nodes": [{"id": 9, "type": "NoSuchNode", "mode": 0}], "links": []}
    with pytest.raises(WorkflowError, match=r"node 9 has type 'NoSuchNode'"):
        ui_to_api(unknown, comfy_object_info)
    short = {"nodes": [{"id": 4, "type": "KSampler", "mode": 0, "widgets_values": [42, 20]}], "links": []}
    with pytest.raises(WorkflowError, match=r"node 4 \(KSampler\) has 2 widgets_values"):
        ui_to_api(short, comfy_object_info)
    broken = {"nodes": [{"id": 1, "type": "ImageInvert", "mode": 0,
                         "inputs": [_socket("image", "IMAGE", 77)]}], "links": []}
    with pytest.raises(WorkflowError, match="missing link 77"):
        ui_to_api(broken, comfy_object_info)
    with pytest.raises(WorkflowError, match="API prompt"):
        ui_to_api(SAMPLER_PROMPT, comfy_object_info)


def test_converted_workflow_runs_and_saves_the_inverted_image(comfy_server, comfy_object_info):
    prompt = ui_to_api(INVERT_WORKFLOW, comfy_object_info)
    assert prompt["4"]["inputs"] == {"image": ["1", 0]}  # through the reroute and the bypassed flip

    entry = comfy_client.run_prompt(comfy_server.url, prompt, timeout=120, is_alive=comfy_server.is_running)

    files = comfy_client.output_files(entry)
    assert [(f["filename"], f["type"]) for f in files] == [("client_invert_00001_.png", "output")]
    pixels = np.asarray(Image.open(comfy_server.output_dir / files[0]["filename"]).convert("RGB"))
    assert pixels.shape == (4, 8, 3)
    inverted = np.array([0xFF - 0x33, 0xFF - 0x66, 0xFF - 0x99])
    # SaveImage truncates 255 * value to uint8, so a channel may land one below.
    assert (np.abs(pixels.astype(int) - inverted) <= 1).all(), pixels[0, 0]


def test_rejected_prompt_reports_node_errors(comfy_server, comfy_object_info):
    prompt = ui_to_api(SAMPLER_WORKFLOW, comfy_object_info)
    with pytest.raises(comfy_client.PromptRejected) as caught:
        comfy_client.queue_prompt(comfy_server.url, prompt)
    message = str(caught.value)
    assert "node 1 'Load Checkpoint' (CheckpointLoaderSimple) input 'ckpt_name': Value not in list" in message
    assert "tiny.safetensors" in message
    assert "15" in caught.value.response["node_errors"]  # SaveImage lost its muted input
    assert "Required input is missing" in message


def test_accepted_prompt_with_node_errors_is_cancelled_and_reported(comfy_server):
    """ComfyUI queues a prompt when some outputs are valid and skips the others: the client refuses that."""
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0},
              "_meta": {"title": "Too narrow"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    with pytest.raises(comfy_client.PromptRejected) as caught:
        comfy_client.queue_prompt(comfy_server.url, prompt)
    message = str(caught.value)
    assert message.startswith("the server would skip nodes whose inputs it rejected, so the prompt was cancelled")
    assert "node 3 'Too narrow' (EmptyImage) input 'width': Value 0 smaller than min of 1" in message
    assert caught.value.response["prompt_id"]
    # Nothing is left queued or running.
    deadline = time.monotonic() + 60
    while True:
        queue = comfy_client._request(comfy_server.url + "/queue")[1]
        if not queue["queue_running"] and not queue["queue_pending"]:
            break
        assert time.monotonic() < deadline, queue
        time.sleep(0.2)
    # The same graph with the bad value fixed runs.
    prompt["3"]["inputs"]["width"] = 4
    entry = comfy_client.run_prompt(comfy_server.url, prompt, timeout=120, is_alive=comfy_server.is_running)
    assert set(entry["outputs"]) == {"2", "4"}


def test_execution_error_carries_the_exception(comfy_server):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "alpha"}},  # RGB only
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    with pytest.raises(comfy_client.ExecutionFailed, match=r"node 2 \(ImageToMask\) raised IndexError"):
        comfy_client.run_prompt(comfy_server.url, prompt, timeout=120, is_alive=comfy_server.is_running)


def test_interrupt_is_accepted(comfy_server):
    comfy_client.interrupt(comfy_server.url)  # nothing runs: the server answers 200 and stays up
    assert comfy_client.system_stats(comfy_server.url)["system"]["comfyui_version"] == "0.3.75"
