"""The pack's HTTP route for its front-end, through the real server: the window plan the Windows node draws."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from flashportrait_core.sampling.windows import plan_windows

pytestmark = pytest.mark.graph


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_window_plan_route_answers_the_samplers_plan(comfy_server, prefix):
    # 500 driving frames: trimmed to 497 = 4*124 + 1 -> 125 latent frames.
    status, plan = _get(f"{comfy_server.url}{prefix}/flashportrait/window_plan?frames=500&length=51&overlap=30")
    assert status == 200
    assert (plan["video_frames"], plan["kept_frames"], plan["latent_frames"]) == (500, 497, 125)
    assert plan["windows"] == [[0, 51], [21, 72], [42, 93], [63, 114], [74, 125]]
    assert plan["windows"] == [list(w) for w in plan_windows(125, 51, 30).windows]
    assert plan["overlaps"] == [0, 30, 30, 30, 40]  # the last window is moved back to end at the last frame


def test_short_video_gets_one_window(comfy_server):
    status, plan = _get(f"{comfy_server.url}/flashportrait/window_plan?frames=33&length=51&overlap=30")
    assert status == 200
    assert plan["latent_frames"] == 9 and plan["windows"] == [[0, 9]] and plan["overlaps"] == [0]


@pytest.mark.parametrize("query, message", [
    ("frames=500&length=20&overlap=20", "window overlap must be in [0, length - 1] = [0, 19], got 20"),
    ("frames=0&length=51&overlap=30", "frames must be between 1 and"),
    ("frames=abc&length=51&overlap=30", "query parameter 'frames' must be an integer, got 'abc'"),
    ("length=51&overlap=30", "missing query parameter 'frames'"),
])
def test_bad_queries_are_refused_with_the_reason(comfy_server, query, message):
    status, body = _get(f"{comfy_server.url}/flashportrait/window_plan?{query}")
    assert status == 400
    assert message in body["error"]
