"""Window-parallel sampling through a real server: FlashPortrait Devices with 2 and 3 CPU workers (gloo) on the
tiny models against the same graph sampled in ComfyUI's own process, then interrupt, a killed worker, and shutdown.

17 driving frames give 5 latent frames, windows of 2 with overlap 1 give 4 windows: with 2 workers each owns two
windows, with 3 workers the first owns windows 0 and 3. Latents come back through ComfyUI's SaveLatent node; the
workers' processes and counts through the pack's /flashportrait/devices route.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scripts import comfy_client, host
from scripts.workflow_prep import tiny_animation_prompt

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "data"
REFERENCE = DATA / "reference" / "fp_case1.png"
DRIVING = DATA / "driving" / "lp_d0.mp4"
STEPS = 3
WINDOWS = 4

pytestmark = pytest.mark.graph


def base_prompt(steps: int = STEPS) -> dict:
    """Models, 17 driving frames (5 latent frames, 4 windows of 2 with overlap 1), conditioning: nodes 1-9; the
    one-process sampler is node 10."""
    prompt = tiny_animation_prompt(DRIVING.name, REFERENCE.name, seed=7, window_length=2, overlap=1, steps=steps)
    prompt["6"]["inputs"]["max_frames"] = 17
    return prompt


def devices(prompt: dict, node_id: str, spec: str, timeout_s: int = 300) -> list:
    prompt[node_id] = {"class_type": "FlashPortraitDevices",
                       "inputs": {"devices": spec, "threads": 0, "timeout_s": timeout_s}}
    return [node_id, 0]


def sampler_on(prompt: dict, node_id: str, devices_ref: list | None, **inputs) -> None:
    """A copy of base_prompt's sampler node 10 (with ``inputs`` changed) sampling on ``devices_ref``."""
    prompt[node_id] = json.loads(json.dumps(base_prompt()["10"]))
    prompt[node_id]["inputs"].update(inputs)
    if devices_ref is not None:
        prompt[node_id]["inputs"]["devices"] = devices_ref


def save(prompt: dict, source: str, prefix: str) -> None:
    prompt[f"{source}save"] = {"class_type": "SaveLatent",
                               "inputs": {"samples": [source, 0], "filename_prefix": f"latents/devices_{prefix}"}}


def guider_on(prompt: dict, node_id: str, devices_ref: list | None) -> None:
    """FlashPortrait Guider under SamplerCustomAdvanced (euler, published schedule)."""
    prompt[node_id] = {"class_type": "FlashPortraitGuider", "inputs": {
        "model": ["1", 0], "positive": ["9", 0], "negative": ["9", 1], "clip_vision_output": ["9", 2],
        "vae": ["4", 0], "reference_image": ["5", 0], "emotion": ["7", 0], "windows": ["8", 0], "max_side": 32,
        "acceleration": "off", "target_speedup": 0.0, "resume": "off"}}
    if devices_ref is not None:
        prompt[node_id]["inputs"]["devices"] = devices_ref
    prompt[f"{node_id}n"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}}
    prompt[f"{node_id}k"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    prompt[f"{node_id}s"] = {"class_type": "FlashPortraitSchedule",
                             "inputs": {"schedule": "published", "steps": STEPS, "shift": 5.0, "denoise": 1.0}}
    prompt[f"{node_id}c"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": [f"{node_id}n", 0], "guider": [node_id, 0], "sampler": [f"{node_id}k", 0],
        "sigmas": [f"{node_id}s", 0], "latent_image": [node_id, 1]}}
    save(prompt, f"{node_id}c", node_id)


def latents_of(server) -> dict[str, torch.Tensor]:
    out = {}
    for path in (server.output_dir / "latents").glob("devices_*.latent"):
        out[path.name.removeprefix("devices_").rsplit("_", 2)[0]] = load_file(str(path))["latent_tensor"]
    return out


def status(url: str) -> dict:
    _, answer = comfy_client._request(url + "/flashportrait/devices")
    return answer


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) has stopped too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def media(comfy_server):
    for path in (REFERENCE, DRIVING):
        shutil.copy(path, comfy_server.input_dir / path.name)


@pytest.fixture(scope="module")
def two_workers(comfy_server, media):
    """One prompt: the one-process sampler (ALP off and quality, a LoRA) and the guider, each also on cpu x2."""
    prompt = base_prompt()
    save(prompt, "10", "single")
    pair = devices(prompt, "60", "cpu x2")
    sampler_on(prompt, "11", pair)
    save(prompt, "11", "two")
    sampler_on(prompt, "12", None, acceleration="quality")
    save(prompt, "12", "single_alp")
    sampler_on(prompt, "13", pair, acceleration="quality")
    save(prompt, "13", "two_alp")
    prompt["40"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["1", 0], "lora_name": "fast_lora_tiny.safetensors", "strength_model": 1.0}}
    sampler_on(prompt, "14", None, model=["40", 0])
    save(prompt, "14", "single_lora")
    sampler_on(prompt, "15", pair, model=["40", 0])
    save(prompt, "15", "two_lora")
    guider_on(prompt, "20", None)
    guider_on(prompt, "21", pair)
    entry = comfy_client.run_prompt(comfy_server.url, prompt, timeout=900)
    return entry, latents_of(comfy_server), status(comfy_server.url)


def report_of(entry: dict, node: str) -> str:
    return entry["outputs"][node]["text"][0]


def test_two_cpu_workers_give_the_latents_of_one_process(two_workers):
    _, latents, _ = two_workers
    assert latents["single"].shape == (1, 16, 5, 4, 4)
    assert torch.equal(latents["two"], latents["single"])  # bit-identical: same kernels, same threads, same order


def test_two_workers_with_alp_give_the_latents_and_counts_of_one_process(two_workers):
    entry, latents, _ = two_workers
    assert torch.equal(latents["two_alp"], latents["single_alp"])
    assert not torch.equal(latents["two_alp"], latents["two"])  # ALP did skip steps
    single, parallel = report_of(entry, "12"), report_of(entry, "13")
    # The per-window ALP counts and DiT passes come back from the workers that own the windows.
    assert [line for line in parallel.splitlines() if "window" in line and "ALP" in line] == \
        [line for line in single.splitlines() if "window" in line and "ALP" in line]


def test_a_lora_reaches_the_workers(two_workers):
    _, latents, _ = two_workers
    assert torch.equal(latents["two_lora"], latents["single_lora"])
    assert not torch.allclose(latents["two_lora"], latents["two"])


def test_the_guider_under_samplercustomadvanced_on_two_workers(two_workers):
    _, latents, _ = two_workers
    assert torch.equal(latents["21"], latents["20"])
    assert torch.equal(latents["21"], latents["single"])


def test_each_worker_evaluated_its_own_windows(two_workers):
    _, _, answer = two_workers
    assert answer["running"] and answer["alive"]
    assert [w["label"] for w in answer["workers"]] == ["cpu#0", "cpu#1"]
    assert all(pid_running(w["pid"]) for w in answer["workers"])
    # The last run (whichever sampler ran last; with ALP a skipped step is forecast on the window's worker too)
    # sent 4 windows x 3 steps, two windows per worker and step, and moved them both ways.
    job = answer["last_job"]
    assert job["windows_evaluated"] == WINDOWS * STEPS
    assert job["per_worker"] == {"cpu#0": 2 * STEPS, "cpu#1": 2 * STEPS}
    assert job["bytes_sent"] > 0 and job["bytes_received"] > 0


def test_workers_are_reused_by_the_next_run(comfy_server, two_workers):
    _, latents, before = two_workers
    prompt = base_prompt()
    sampler_on(prompt, "11", devices(prompt, "60", "cpu x2"), seed=8)
    del prompt["10"]
    save(prompt, "11", "two_seed8")
    comfy_client.run_prompt(comfy_server.url, prompt, timeout=600)
    after = status(comfy_server.url)
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
    assert after["last_job"]["per_worker"] == {"cpu#0": 2 * STEPS, "cpu#1": 2 * STEPS}
    assert not torch.equal(latents_of(comfy_server)["two_seed8"], latents["two"])


def test_three_cpu_workers_give_the_latents_of_one_process(comfy_server, two_workers):
    _, latents, _ = two_workers
    prompt = base_prompt()
    del prompt["10"]
    trio = devices(prompt, "61", "cpu x3")
    sampler_on(prompt, "11", trio)
    save(prompt, "11", "three")
    sampler_on(prompt, "12", trio, acceleration="quality")
    save(prompt, "12", "three_alp")
    entry = comfy_client.run_prompt(comfy_server.url, prompt, timeout=900)
    three = latents_of(comfy_server)
    assert torch.equal(three["three"], latents["single"])
    assert torch.equal(three["three_alp"], latents["single_alp"])
    answer = status(comfy_server.url)
    assert [w["label"] for w in answer["workers"]] == ["cpu#0", "cpu#1", "cpu#2"]
    # Windows 0 and 3 on the first worker, 1 and 2 on the others: 2 + 1 + 1 window evaluations per step.
    assert "4 window(s)" in report_of(entry, "11")


def test_an_interrupt_stops_the_workers_within_one_window_step(comfy_server, two_workers):
    prompt = base_prompt(steps=40)
    del prompt["10"]
    sampler_on(prompt, "11", devices(prompt, "60", "cpu x2"), steps=40)
    save(prompt, "11", "interrupted")
    comfy_client.run_prompt(comfy_server.url, base_prompt_on_pair("warm"), timeout=600)  # the cpu x2 pool runs
    previous = status(comfy_server.url)["last_job"]["job"]
    prompt_id = comfy_client.queue_prompt(comfy_server.url, prompt)
    wait_until(lambda: started_windows(comfy_server.url, previous) >= 2, 300, "the run did not start on the workers")
    comfy_client.interrupt(comfy_server.url)
    with pytest.raises(comfy_client.ExecutionFailed, match="interrupted"):
        comfy_client.wait_for_result(comfy_server.url, prompt_id, timeout=120)
    answer = status(comfy_server.url)
    job = answer["last_job"]
    assert job["interrupted"]
    assert job["results_after_interrupt"] <= 2  # at most the one window each worker had in flight
    assert job["windows_evaluated"] < 40 * WINDOWS
    assert answer["alive"] and not any(w["busy"] for w in answer["workers"])
    # The same workers sample the next run, and it is still exact.
    prompt = base_prompt()
    del prompt["10"]
    sampler_on(prompt, "11", devices(prompt, "60", "cpu x2"))
    save(prompt, "11", "after_interrupt")
    comfy_client.run_prompt(comfy_server.url, prompt, timeout=600)
    assert torch.equal(latents_of(comfy_server)["after_interrupt"], two_workers[1]["single"])
    assert [w["pid"] for w in status(comfy_server.url)["workers"]] == [w["pid"] for w in answer["workers"]]


def test_a_killed_worker_is_an_error_naming_its_device_and_nothing_is_left(comfy_server, two_workers):
    prompt = base_prompt(steps=40)
    del prompt["10"]
    sampler_on(prompt, "11", devices(prompt, "60", "cpu x2"), steps=40)
    save(prompt, "11", "killed")
    comfy_client.run_prompt(comfy_server.url, base_prompt_on_pair("warm"), timeout=600)  # the cpu x2 pool runs
    answer = status(comfy_server.url)
    workers, previous = answer["workers"], answer["last_job"]["job"]
    prompt_id = comfy_client.queue_prompt(comfy_server.url, prompt)
    wait_until(lambda: started_windows(comfy_server.url, previous) >= 2, 300, "the run did not start on the workers")
    os.kill(workers[1]["pid"], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(comfy_client.ExecutionFailed) as failed:
        comfy_client.wait_for_result(comfy_server.url, prompt_id, timeout=120)
    assert time.monotonic() - started < 60  # reported at once, not after the 300 s timeout
    message = str(failed.value)
    assert "cpu#1" in message and str(workers[1]["pid"]) in message and "stopped" in message
    # The other worker was shut down too: no process of the pool is left.
    wait_until(lambda: not any(pid_running(w["pid"]) for w in workers), 20, "workers still running")
    assert not status(comfy_server.url)["alive"]
    # Queued again, the pool restarts with new processes and samples exactly.
    prompt = base_prompt_on_pair()
    comfy_client.run_prompt(comfy_server.url, prompt, timeout=600)
    restarted = status(comfy_server.url)
    assert restarted["alive"] and {w["pid"] for w in restarted["workers"]}.isdisjoint(w["pid"] for w in workers)
    assert torch.equal(latents_of(comfy_server)["restarted"], two_workers[1]["single"])


def base_prompt_on_pair(prefix: str = "restarted") -> dict:
    prompt = base_prompt()
    del prompt["10"]
    sampler_on(prompt, "11", devices(prompt, "60", "cpu x2"))
    save(prompt, "11", prefix)
    return prompt


def started_windows(url: str, previous_job: int) -> int:
    """Windows the workers evaluated in a run after ``previous_job`` (0 until that run reached them)."""
    job = status(url).get("last_job", {})
    return job.get("windows_evaluated", 0) if job.get("job", 0) > previous_job else 0


@pytest.mark.parametrize("spec, message", [("gpu:0", "is not a device"), ("cuda:0,0", "named twice")])
def test_device_lists_that_are_no_devices_are_refused_before_anything_runs(comfy_server, media, spec, message):
    prompt = base_prompt()
    sampler_on(prompt, "11", devices(prompt, "60", spec))
    del prompt["10"]
    save(prompt, "11", "refused")
    with pytest.raises(comfy_client.PromptRejected, match=message):
        comfy_client.queue_prompt(comfy_server.url, prompt)


def test_gpus_this_machine_lacks_are_named_in_the_error(comfy_server, media):
    # The server runs this torch build on this machine: it sees as many CUDA devices as this process.
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    prompt = base_prompt()
    del prompt["10"]
    sampler_on(prompt, "11", devices(prompt, "63", f"cuda:{count},{count + 1}"))
    save(prompt, "11", "no_gpu")
    with pytest.raises(comfy_client.ExecutionFailed,
                       match=f"cuda:{count}, cuda:{count + 1} not found; this machine has"):
        comfy_client.run_prompt(comfy_server.url, prompt, timeout=600)


def test_one_device_samples_in_comfyuis_own_process(comfy_server, two_workers):
    _, latents, _ = two_workers
    before = status(comfy_server.url)
    prompt = base_prompt()
    del prompt["10"]
    sampler_on(prompt, "11", devices(prompt, "62", "cpu"))
    save(prompt, "11", "one_device")
    comfy_client.run_prompt(comfy_server.url, prompt, timeout=600)
    assert torch.equal(latents_of(comfy_server)["one_device"], latents["single"])
    after = status(comfy_server.url)
    assert after.get("last_job", {}).get("job") == before.get("last_job", {}).get("job")  # no worker ran


def test_resume_with_several_devices_is_refused_with_the_reason(comfy_server, two_workers):
    prompt = base_prompt()
    del prompt["10"]
    sampler_on(prompt, "11", devices(prompt, "60", "cpu x2"), resume="every step")
    save(prompt, "11", "resume_refused")
    with pytest.raises(comfy_client.ExecutionFailed, match="resume checkpoints are not written when sampling on "
                                                           "several devices"):
        comfy_client.run_prompt(comfy_server.url, prompt, timeout=600)


def test_workers_are_gone_after_comfyui_exits(comfyui_dir, tiny_models_dir, tmp_path):
    """Its own server: stopped as a user stops ComfyUI (Ctrl+C), and one killed outright (no exit handlers)."""
    for how in ("interrupt", "kill"):
        run = tmp_path / how
        server = host.start_server(tiny_models_dir, run / "input", run / "output", run / "temp",
                                   comfyui_dir=comfyui_dir)
        try:
            for path in (REFERENCE, DRIVING):
                shutil.copy(path, server.input_dir / path.name)
            comfy_client.run_prompt(server.url, base_prompt_on_pair("exit"), timeout=600)
            workers = status(server.url)["workers"]
            assert len(workers) == 2 and all(pid_running(w["pid"]) for w in workers)
            if how == "interrupt":
                server.stop()  # SIGINT: ComfyUI exits, its exit handler stops the workers
                assert not any(pid_running(w["pid"]) for w in workers)
            else:
                os.kill(server.process.pid, signal.SIGKILL)  # only the server: the workers notice it is gone
                server.process.wait(10)
                wait_until(lambda: not any(pid_running(w["pid"]) for w in workers), 15, "workers outlived ComfyUI")
        finally:
            server.stop()
