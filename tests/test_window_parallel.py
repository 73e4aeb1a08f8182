"""The pure parts of window-parallel sampling: device lists, window owners, and the blend of predictions that
arrive from several devices in any order."""
from __future__ import annotations

import random

import pytest
import torch

from flashportrait_core.sampling.devices import device_labels, parse_devices, window_owners
from flashportrait_core.sampling.loop import blend_in_window_order, blend_windows, window_slice
from flashportrait_core.sampling.windows import blend_weights, plan_windows


@pytest.mark.parametrize("spec, devices", [
    ("cuda:0,1,2,3", ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
    ("cuda:0, cuda:2", ["cuda:0", "cuda:2"]),
    ("cpu x3", ["cpu", "cpu", "cpu"]),
    ("cpu*2", ["cpu", "cpu"]),
    ("cpu", ["cpu"]),
    ("CUDA:1", ["cuda:1"]),
])
def test_device_lists(spec, devices):
    assert parse_devices(spec) == devices


@pytest.mark.parametrize("spec, message", [
    ("", "no device"), ("gpu:0", "is not a device"), ("cuda:0,0", "named twice"), ("cpu x0", "at least 1"),
    ("cpu x65", "at most 64"),
])
def test_lists_that_are_no_devices_say_why(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_devices(spec)


def test_cpu_workers_get_numbered_labels():
    assert device_labels(["cpu", "cpu", "cuda:1"]) == ["cpu#0", "cpu#1", "cuda:1"]


def test_windows_go_round_robin_so_each_worker_has_at_most_its_share():
    owners = window_owners(7, 3)
    assert owners == [0, 1, 2, 0, 1, 2, 0]
    assert max(owners.count(w) for w in range(3)) == 3  # ceil(7 / 3)
    with pytest.raises(ValueError):
        window_owners(3, 0)


@pytest.mark.parametrize("crossfade", [False, True])
def test_predictions_in_any_order_blend_bit_identically_to_the_one_device_loop(crossfade):
    plan = plan_windows(23, 6, 3)
    x = torch.randn(1, 4, 23, 3, 5)
    weights = blend_weights(plan, crossfade)
    predictions = {k: torch.sin(window_slice(x, plan, k) * (k + 1.3)) for k in range(len(plan.windows))}
    expected = blend_windows(x, plan, lambda k, window_x: predictions[k], weights)
    order = list(predictions)
    random.Random(3).shuffle(order)
    seen = []
    blended = blend_in_window_order(x, plan, ((k, predictions[k]) for k in order), weights,
                                    after_window=lambda k, partial: seen.append(k))
    assert torch.equal(blended, expected)
    assert seen == list(range(len(plan.windows)))  # the per-window hook still sees the windows in order
    # Added in the order of arrival the float sums would differ in the last bits, which is why the order is kept.
    arrival = torch.zeros_like(x)
    for k in order:
        start, end = plan.windows[k]
        w = weights[k, start:end].float().reshape(1, 1, -1, 1, 1)
        arrival.narrow(2, start, end - start).add_(predictions[k] * w)
    assert torch.allclose(arrival, expected, atol=1e-6)


def test_a_continued_step_and_missing_or_repeated_windows():
    plan = plan_windows(10, 4, 2)
    x = torch.randn(1, 2, 10, 2, 2)
    weights = blend_weights(plan, True)
    predictions = {k: window_slice(x, plan, k) * k for k in range(len(plan.windows))}
    full = blend_windows(x, plan, lambda k, window_x: predictions[k], weights)
    partial = blend_windows(x, plan, lambda k, window_x: predictions[k] if k < 2 else torch.zeros_like(window_x),
                            weights)
    rest = blend_in_window_order(x, plan, ((k, predictions[k]) for k in (3, 2)), weights, first_window=2,
                                 blended=partial.clone())
    assert torch.equal(rest, full)
    with pytest.raises(ValueError, match="missing"):
        blend_in_window_order(x, plan, ((k, predictions[k]) for k in (0, 2)), weights)
    with pytest.raises(ValueError, match="came twice"):
        blend_in_window_order(x, plan, ((k, predictions[k]) for k in (0, 0)), weights)
