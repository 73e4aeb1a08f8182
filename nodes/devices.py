"""The FlashPortrait Devices node: device workers for window-parallel sampling, started here and held for reuse."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..flashportrait_core.sampling.devices import parse_devices
from . import types
from .window_pool import DeviceSet, pool_for

DEVICES_TOOLTIP = ("Optional: FlashPortrait Devices, to sample the windows of each step on several GPUs at once "
                   "(same latents as one device). Leave empty to sample in ComfyUI's own process.")


def devices_input() -> io.Custom.Input:
    return types.Devices.Input("devices", optional=True, tooltip=DEVICES_TOOLTIP)


def check_available(devices: list[str]) -> None:
    """CUDA devices that this machine does not have, refused with what it has."""
    wanted = sorted({int(device.split(":")[1]) for device in devices if device.startswith("cuda:")})
    if not wanted:
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [index for index in wanted if index >= count]
    if missing:
        have = f"cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
        raise ValueError(f"FlashPortrait Devices: {', '.join(f'cuda:{i}' for i in missing)} not found; this "
                         f"machine has {have}")


class FlashPortraitDevices(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitDevices",
            display_name="FlashPortrait Devices",
            category="FlashPortrait",
            description="Samples the windows of every step on several devices at once: one worker process per "
                        "device loads the same model files, ComfyUI blends the windows as on one device, so the "
                        "latents are the same. Connect to the devices input of FlashPortrait Sampler or Guider. "
                        "Workers are started here and kept for later runs; one device samples in ComfyUI's own "
                        "process as without this node.",
            inputs=[
                io.String.Input("devices", default="cuda:0,1",
                                tooltip="Devices, one worker each: cuda:0,1,2,3 (further CUDA devices as bare "
                                        "numbers), cuda:0,cuda:2, or cpu x N (N CPU workers, for testing). Each "
                                        "GPU holds a whole copy of the model; a window keeps its device for the "
                                        "whole run."),
                io.Int.Input("threads", default=0, min=0, max=256,
                             tooltip="Torch threads of each CPU worker; 0 uses as many as ComfyUI's process, "
                                     "which keeps CPU results bit-identical to one device. No effect on GPUs."),
                io.Int.Input("timeout_s", default=1800, min=10, max=86400,
                             tooltip="Longest a worker may take for one window step or to load the model before "
                                     "the run stops with an error naming it (a stuck or lost device)."),
            ],
            outputs=[types.Devices.Output(display_name="devices"),
                     io.String.Output(display_name="report", tooltip="The workers and their devices.")],
        )

    @classmethod
    def validate_inputs(cls, devices: str) -> bool | str:
        try:
            parse_devices(devices)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, devices: str, threads: int = 0, timeout_s: int = 1800) -> io.NodeOutput:
        names = parse_devices(devices)
        check_available(names)
        device_set = DeviceSet(tuple(names), int(threads), float(timeout_s))
        if not device_set.parallel:
            return io.NodeOutput(device_set, f"one device ({names[0]}): sampled in ComfyUI's own process")
        pool = pool_for(device_set)  # started now, so that a device that cannot start fails on this node
        workers = ", ".join(f"{w.label} (process {w.process.pid})" for w in pool.workers)
        return io.NodeOutput(device_set, f"{len(pool.workers)} workers: {workers}")
