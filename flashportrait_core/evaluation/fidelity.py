"""Expression fidelity: the output video's expression features against the driving ones, per component.

Both come from the same extractor (face points, alignment, PD-FGC), so a perfect animation of the driving
performance scores 0. The error of a component in a frame is the mean absolute difference over its values; it is
also given relative to how much the driving component itself varies over the video (its values' mean standard
deviation), so 1 means "off by as much as the driving motion spans", comparable across components.
"""

from __future__ import annotations

import numpy as np

from ..expression.edit import COMPONENTS

# A driving component that does not move at all (e.g. held by an edit) still gets a finite relative error.
MIN_SPREAD = 1e-6


def component_errors(output: np.ndarray, driving: np.ndarray) -> dict[str, np.ndarray]:
    """Per component, the mean absolute difference per frame [N] between output and driving features [N, 554]."""
    if output.shape != driving.shape or output.ndim != 2:
        raise ValueError(f"output and driving features must have the same shape [N, 554], got {output.shape} and "
                         f"{driving.shape}")
    difference = np.abs(output.astype(np.float64) - driving.astype(np.float64))
    return {name: difference[:, part].mean(axis=1) for name, part in COMPONENTS.items()}


def component_spreads(driving: np.ndarray) -> dict[str, float]:
    """Per component, how much the driving features vary over time: the mean over its values of their standard
    deviation over the frames (at least MIN_SPREAD)."""
    values = driving.astype(np.float64)
    return {name: max(float(values[:, part].std(axis=0).mean()), MIN_SPREAD) for name, part in COMPONENTS.items()}


def relative_errors(errors: dict[str, np.ndarray], spreads: dict[str, float]) -> dict[str, np.ndarray]:
    return {name: errors[name] / spreads[name] for name in errors}
