"""FlashPortrait inside ComfyUI's own sampling, through a real server: the guider under SamplerCustomAdvanced with
ComfyUI's samplers and schedulers, ALP, a LoRA and a refining pass, against the one-node sampler.

Latents come back through ComfyUI's SaveLatent node; previews and the guider's report through a websocket client.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from pathlib import Path

import aiohttp
import pytest
import torch
from safetensors.torch import load_file

from scripts import comfy_client
from scripts.workflow_prep import tiny_animation_prompt

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "data"
REFERENCE = DATA / "reference" / "fp_case1.png"
DRIVING = DATA / "driving" / "lp_d0.mp4"
STEPS = 3

pytestmark = pytest.mark.graph


def base_prompt() -> dict:
    """Models, 9 driving frames (3 latent frames, 2 windows of 2 with overlap 1), conditioning: nodes 1-9."""
    prompt = tiny_animation_prompt(DRIVING.name, REFERENCE.name, seed=7, window_length=2, overlap=1, steps=STEPS)
    prompt["6"]["inputs"]["max_frames"] = 9
    return prompt


def guider(node_id: str, prompt: dict, model=("1", 0), acceleration: str = "off") -> str:
    prompt[node_id] = {"class_type": "FlashPortraitGuider", "inputs": {
        "model": list(model), "positive": ["9", 0], "negative": ["9", 1], "clip_vision_output": ["9", 2],
        "vae": ["4", 0], "reference_image": ["5", 0], "emotion": ["7", 0], "windows": ["8", 0], "max_side": 32,
        "acceleration": acceleration, "target_speedup": 0.0, "resume": "off"}}
    return node_id


def custom_sample(node_id: str, prompt: dict, guider_id: str, sampler: str, sigmas: list, latent: list | None = None,
                  prefix: str | None = None) -> None:
    prompt[f"{node_id}n"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}}
    prompt[f"{node_id}s"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}}
    prompt[node_id] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": [f"{node_id}n", 0], "guider": [guider_id, 0], "sampler": [f"{node_id}s", 0], "sigmas": sigmas,
        "latent_image": latent or [guider_id, 1]}}
    save(prompt, node_id, prefix or node_id)


def save(prompt: dict, source: str, prefix: str) -> None:
    prompt[f"{source}save"] = {"class_type": "SaveLatent",
                               "inputs": {"samples": [source, 0], "filename_prefix": f"latents/guider_{prefix}"}}


def schedule(node_id: str, prompt: dict, denoise: float = 1.0) -> list:
    prompt[node_id] = {"class_type": "FlashPortraitSchedule",
                       "inputs": {"schedule": "published", "steps": STEPS, "shift": 5.0, "denoise": denoise}}
    return [node_id, 0]


async def _run_with_websocket(url: str, prompt: dict) -> tuple[str, list[bytes], list[dict]]:
    client_id = uuid.uuid4().hex
    previews, events = [], []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url.replace("http://", "ws://") + f"/ws?clientId={client_id}") as ws:
            prompt_id = await asyncio.to_thread(comfy_client.queue_prompt, url, prompt, client_id)
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    previews.append(message.data)
                    continue
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                event = json.loads(message.data)
                events.append(event)
                data = event.get("data") or {}
                if data.get("prompt_id") == prompt_id and event["type"] in ("execution_success", "execution_error",
                                                                           "execution_interrupted"):
                    break
    return prompt_id, previews, events


@pytest.fixture(scope="module")
def guider_run(comfy_server):
    for media in (REFERENCE, DRIVING):
        shutil.copy(media, comfy_server.input_dir / media.name)
    prompt = base_prompt()
    save(prompt, "10", "sampler_node")  # the one-node sampler, published schedule, euler
    guider("20", prompt)
    custom_sample("21", prompt, "20", "euler", schedule("22", prompt))
    custom_sample("23", prompt, "20", "uni_pc", schedule("22", prompt))
    prompt["24"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple",
                                                                "steps": STEPS, "denoise": 1.0}}
    custom_sample("25", prompt, "20", "dpmpp_2m", ["24", 0])
    # One of ComfyUI's other samplers chosen on the sampler node against the same one through KSamplerSelect.
    prompt["26"] = json.loads(json.dumps(prompt["10"]))
    prompt["26"]["inputs"].update(sampler="ipndm")
    save(prompt, "26", "sampler_node_ipndm")
    custom_sample("27", prompt, "20", "ipndm", schedule("22", prompt))
    # ALP: the guider under ComfyUI's euler against the sampler node, same preset.
    guider("30", prompt, acceleration="quality")
    custom_sample("31", prompt, "30", "euler", schedule("22", prompt))
    prompt["32"] = json.loads(json.dumps(prompt["10"]))
    prompt["32"]["inputs"].update(acceleration="quality")
    save(prompt, "32", "sampler_node_alp")
    # A LoRA applied by ComfyUI's loader reaches the guider's model.
    prompt["40"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0],
                                                                    "lora_name": "fast_lora_tiny.safetensors",
                                                                    "strength_model": 1.0}}
    guider("41", prompt, model=("40", 0))
    custom_sample("42", prompt, "41", "euler", schedule("22", prompt))
    # Refining the sampler node's latents: denoise 0.5 through the guider and through the sampler node.
    custom_sample("50", prompt, "20", "euler", schedule("51", prompt, denoise=0.5), latent=["10", 0])
    prompt["52"] = json.loads(json.dumps(prompt["10"]))
    prompt["52"]["inputs"].update(latent=["10", 0], denoise=0.5)
    save(prompt, "52", "sampler_node_refine")
    prompt_id, previews, events = asyncio.run(_run_with_websocket(comfy_server.url, prompt))
    entry = comfy_client.wait_for_result(comfy_server.url, prompt_id, timeout=900)
    latents = {}
    for path in (comfy_server.output_dir / "latents").glob("guider_*.latent"):
        latents[path.name.removeprefix("guider_").rsplit("_", 2)[0]] = load_file(str(path))["latent_tensor"]
    return entry, latents, previews, events


def test_guider_with_euler_and_the_schedule_equals_the_sampler_node(guider_run):
    _, latents, _, _ = guider_run
    assert latents["sampler_node"].shape == (1, 16, 3, 4, 4)
    assert torch.equal(latents["21"], latents["sampler_node"])


def test_the_sampler_nodes_comfyui_sampler_equals_the_guider_with_ksamplerselect(guider_run):
    _, latents, _, events = guider_run
    assert torch.equal(latents["27"], latents["sampler_node_ipndm"])
    assert torch.isfinite(latents["27"]).all() and not torch.allclose(latents["27"], latents["sampler_node"])
    outputs = {e["data"]["node"]: e["data"]["output"] for e in events if e["type"] == "executed"}
    assert f"x {STEPS} steps (ipndm)" in outputs["26"]["text"][0]


def test_other_samplers_and_schedulers_run_and_differ(guider_run):
    _, latents, _, _ = guider_run
    for name in ("23", "25"):  # uni_pc on the published grid; dpmpp_2m on ComfyUI's simple scheduler
        assert torch.isfinite(latents[name]).all()
        assert not torch.allclose(latents[name], latents["21"])


def test_alp_under_comfyuis_euler_equals_the_sampler_node_with_alp(guider_run):
    _, latents, _, events = guider_run
    assert torch.equal(latents["31"], latents["sampler_node_alp"])
    assert not torch.equal(latents["31"], latents["21"])
    reports = {e["data"]["node"]: e["data"]["output"] for e in events if e["type"] == "flashportrait.report"}
    counts = reports["30"]["flashportrait_report"][0]
    assert counts["steps_skipped"] > 0 and counts["steps_computed"] + counts["steps_skipped"] == 2 * STEPS
    assert "ALP:" in reports["30"]["text"][0]


def test_a_lora_reaches_the_guiders_model(guider_run):
    _, latents, _, _ = guider_run
    assert not torch.allclose(latents["42"], latents["21"])


def test_refining_a_latent_agrees_between_the_guider_and_the_sampler_node(guider_run):
    _, latents, _, _ = guider_run
    assert torch.equal(latents["50"], latents["sampler_node_refine"])
    assert not torch.allclose(latents["50"], latents["sampler_node"])


def test_latent_previews_and_progress_reach_a_websocket_client(guider_run):
    _, _, previews, events = guider_run
    # ComfyUI's previewer (latent2rgb for the Wan latent format): binary preview frames while sampling.
    assert len(previews) >= STEPS
    progress = [e for e in events if e["type"] == "progress" and e["data"].get("node") == "10"]
    assert [e["data"]["value"] for e in progress][-1] == STEPS


def test_cfg_pp_samplers_are_refused_with_the_reason(comfy_server, guider_run):
    prompt = base_prompt()
    guider("30", prompt)
    custom_sample("31", prompt, "30", "euler_cfg_pp", schedule("22", prompt))
    with pytest.raises(comfy_client.ExecutionFailed, match="euler_cfg_pp needs ComfyUI's two-condition CFG"):
        comfy_client.run_prompt(comfy_server.url, prompt, timeout=600)


def test_alp_with_another_sampler_is_refused_with_the_reason(comfy_server, guider_run):
    prompt = base_prompt()
    guider("30", prompt, acceleration="quality")
    custom_sample("31", prompt, "30", "uni_pc", schedule("22", prompt))
    with pytest.raises(comfy_client.ExecutionFailed, match="only with the euler sampler"):
        comfy_client.run_prompt(comfy_server.url, prompt, timeout=600)


@pytest.mark.parametrize("node, widgets, message", [
    ("10", {"acceleration": "off", "target_speedup": 4.0}, "needs an ALP preset"),
    ("10", {"acceleration": "quality", "target_speedup": 1.0}, "is no speed-up"),
    ("10", {"acceleration": "fast", "target_speedup": 12.0}, "bigger than max of 10.0"),
    ("10", {"acceleration": "fast", "sampler": "dpmpp_2m"}, "do not combine"),
    ("10", {"acceleration": "4-step LoRA", "sampler": "ipndm"}, "trained for Euler steps"),
    ("20", {"acceleration": "off", "target_speedup": 3.0}, "needs an ALP preset"),
])
def test_unusable_widget_values_are_refused_before_anything_runs(comfy_server, guider_run, node, widgets, message):
    prompt = base_prompt()
    if node == "20":
        guider("20", prompt)
        custom_sample("21", prompt, "20", "euler", schedule("22", prompt))
    else:
        save(prompt, "10", "refused")
    prompt[node]["inputs"].update(widgets)
    with pytest.raises(comfy_client.PromptRejected) as rejected:
        comfy_client.queue_prompt(comfy_server.url, prompt)
    assert message in str(rejected.value) and "target_speedup" in str(rejected.value)
    errors = rejected.value.response["node_errors"]
    assert list(errors) == [node]  # nothing else, and nothing ran: the prompt never reached the queue
