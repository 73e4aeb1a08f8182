"""Devices for window-parallel sampling: the device list a user types, and which worker owns which window.

Within one denoising step every window starts from the same latents and is independent of the others until the
blend, so the windows of a step can be evaluated on different devices and blended afterwards. A window keeps its
worker for the whole run, because its Adaptive Latent Prediction history lives there.
"""
from __future__ import annotations

import re

# One entry of a device list: cuda:N, a bare N (a further CUDA index), cpu, or cpu with a count (cpu x3, cpu*3).
_CPU_COUNT = re.compile(r"^cpu\s*(?:[x*]\s*(\d+))?$")
_CUDA = re.compile(r"^(?:cuda:)?(\d+)$")
MAX_WORKERS = 64


def parse_devices(spec: str) -> list[str]:
    """The devices of a list such as ``cuda:0,1,2,3``, ``cuda:0,cuda:2`` or ``cpu x3`` (torch device names).

    Raises ValueError naming the entry that is not a device, or a device named twice (two workers on one GPU
    would each hold the whole model and gain nothing).
    """
    devices: list[str] = []
    entries = [entry.strip().lower() for entry in spec.split(",")]
    if not any(entries):
        raise ValueError("no device given; write e.g. cuda:0,1 (CUDA devices 0 and 1) or cpu x2")
    for entry in entries:
        cpu = _CPU_COUNT.match(entry)
        cuda = _CUDA.match(entry)
        if cpu:
            count = int(cpu.group(1) or 1)
            if count < 1:
                raise ValueError(f"'{entry}': the CPU worker count must be at least 1")
            devices.extend(["cpu"] * count)
        elif cuda:
            name = f"cuda:{int(cuda.group(1))}"
            if name in devices:
                raise ValueError(f"{name} is named twice in '{spec}'; each GPU takes one worker")
            devices.append(name)
        else:
            raise ValueError(f"'{entry}' in '{spec}' is not a device; write cuda:N (further CUDA devices as bare "
                             f"numbers: cuda:0,1,2), or cpu, cpu x N")
    if len(devices) > MAX_WORKERS:
        raise ValueError(f"{len(devices)} devices; at most {MAX_WORKERS} workers are supported")
    return devices


def window_owners(num_windows: int, num_workers: int) -> list[int]:
    """The worker of each window: round robin, so neighbouring windows, which a step finishes one after the
    other, run on different workers and every worker has at most ceil(windows / workers) windows per step."""
    if num_workers < 1:
        raise ValueError(f"at least one worker is needed, got {num_workers}")
    return [k % num_workers for k in range(num_windows)]


def device_labels(devices: list[str]) -> list[str]:
    """Names that tell workers apart in messages: cuda:1, or cpu#0, cpu#1 for CPU workers."""
    counts: dict[str, int] = {}
    labels = []
    for device in devices:
        if device == "cpu":
            labels.append(f"cpu#{counts.get('cpu', 0)}")
            counts["cpu"] = counts.get("cpu", 0) + 1
        else:
            labels.append(device)
    return labels
