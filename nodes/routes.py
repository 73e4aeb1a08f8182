"""HTTP routes of the pack, for its front-end extension (``web/flashportrait.js``).

``GET /flashportrait/window_plan?frames=&length=&overlap=`` answers the window plan that the sampler will use
for ``frames`` driving video frames, so the Windows node can draw it without a second implementation of
``plan_windows`` in JavaScript.

``GET /flashportrait/devices`` answers the device workers of FlashPortrait Devices: their devices, processes, and
the last run's counts (``{"running": false}`` when none are held).
"""
from __future__ import annotations

from typing import Any, Mapping

from ..flashportrait_core.conditioning.emotion_tokens import num_latent_frames, trim_to_4k_plus_1
from ..flashportrait_core.sampling.windows import plan_windows

WINDOW_PLAN_ROUTE = "/flashportrait/window_plan"
DEVICES_ROUTE = "/flashportrait/devices"
MAX_PREVIEW_FRAMES = 1_000_000  # far beyond any video; keeps a typo from building a huge plan


def window_plan_summary(video_frames: int, length: int, overlap: int) -> dict[str, Any]:
    """The plan for ``video_frames`` driving frames (trimmed to 4k + 1 as the sampler does), as plain data.

    ``windows`` are half-open latent-frame ranges ``[start, end)``; ``overlaps`` the latent frames each window
    shares with the one before it.
    """
    if not 1 <= video_frames <= MAX_PREVIEW_FRAMES:
        raise ValueError(f"frames must be between 1 and {MAX_PREVIEW_FRAMES}, got {video_frames}")
    kept_frames = trim_to_4k_plus_1(video_frames)
    latent_frames = num_latent_frames(kept_frames)
    plan = plan_windows(latent_frames, length, overlap)
    overlaps = [0] + [max(0, previous_end - start)
                      for (_, previous_end), (start, _) in zip(plan.windows, plan.windows[1:])]
    return {"video_frames": video_frames, "kept_frames": kept_frames, "latent_frames": latent_frames,
            "length": length, "overlap": overlap,
            "windows": [list(window) for window in plan.windows], "overlaps": overlaps}


def parse_window_plan_query(query: Mapping[str, str]) -> tuple[int, int, int]:
    """(frames, length, overlap) from the query string, or a ValueError naming the bad parameter."""
    values = []
    for name in ("frames", "length", "overlap"):
        if name not in query:
            raise ValueError(f"missing query parameter '{name}' (frames=&length=&overlap=)")
        try:
            values.append(int(query[name]))
        except ValueError:
            raise ValueError(f"query parameter '{name}' must be an integer, got {query[name]!r}") from None
    return values[0], values[1], values[2]


_registered = False


def register_routes() -> bool:
    """Add the pack's routes to the running ComfyUI server once; False when there is none (in-process tests)."""
    global _registered
    if _registered:
        return True
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    if getattr(PromptServer, "instance", None) is None:
        return False

    @PromptServer.instance.routes.get(WINDOW_PLAN_ROUTE)
    async def window_plan(request: web.Request) -> web.Response:
        try:
            summary = window_plan_summary(*parse_window_plan_query(request.rel_url.query))
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response(summary)

    @PromptServer.instance.routes.get(DEVICES_ROUTE)
    async def devices(request: web.Request) -> web.Response:
        from .window_pool import active_pool

        pool = active_pool()
        return web.json_response({"running": False} if pool is None else {"running": True, **pool.status()})

    _registered = True
    return True
