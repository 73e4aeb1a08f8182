"""What the sampler shows on its node after a run (the ``ui`` part of its output, read by web/flashportrait.js)."""
from __future__ import annotations

from typing import Any


def sampler_ui(report: Any, text: str) -> dict[str, list]:
    """The report ``text`` plus its counts: windows, latent frames, steps, DiT passes, ALP steps computed/skipped.

    ``report`` is the sampler's SamplingReport; with ALP off every step of every window is computed.
    ``latent_frames`` lets the Windows node feeding the sampler preview the plan of the real video.
    """
    total_steps = len(report.windows) * report.steps
    if report.alp_states:
        computed = sum(len(state.computed_steps) for state in report.alp_states)
    else:
        computed = total_steps
    counts = {"windows": len(report.windows), "latent_frames": max(end for _, end in report.windows),
              "steps": report.steps, "dit_passes": sum(report.model_passes),
              "steps_computed": computed, "steps_skipped": total_steps - computed,
              "seconds": round(report.seconds, 2)}
    return {"text": [text], "flashportrait_report": [counts]}
