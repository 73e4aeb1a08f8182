"""The drift monitor's picture: identity, expression errors and frame-to-frame change over the output's time.

Three panels sharing the time axis (seconds): identity similarity with the threshold and the frames below it
marked in red; each component's expression error relative to the driving motion; the frame-to-frame change. Window
boundaries are dashed vertical lines on every panel. Rendered with matplotlib's Agg canvas (no display, imported
only when called).
"""

from __future__ import annotations

import textwrap

import numpy as np

from ..expression.edit import LABELS
from .monitor import Evaluation

MIN_WIDTH, MIN_HEIGHT = 320, 240
BELOW_COLOUR = "#d62728"
BOUNDARY_COLOUR = "#7f7f7f"


def _exact_size(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Crop or pad (white) to exactly height x width: Agg rounds the figure size to whole pixels."""
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    rows, columns = min(height, image.shape[0]), min(width, image.shape[1])
    canvas[:rows, :columns] = image[:rows, :columns]
    return canvas


def _message(axis, text: str, width: int) -> None:
    """A skipped part's reason, wrapped to the panel, in place of its curves."""
    wrapped = textwrap.fill(text, width=max(40, width // 8), max_lines=4, placeholder=" ... (see the report)")
    axis.text(0.5, 0.5, wrapped, ha="center", va="center", fontsize=8, transform=axis.transAxes)
    axis.set_yticks([])


def plot_evaluation(evaluation: Evaluation, width: int = 1280, height: int = 960) -> np.ndarray:
    """The evaluation as an RGB uint8 image [height, width, 3]."""
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(f"plot size must be at least {MIN_WIDTH}x{MIN_HEIGHT}, got {width}x{height}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting the evaluation needs matplotlib: pip install matplotlib") from error
    fps, count = evaluation.fps, evaluation.frame_count
    seconds = np.arange(count) / fps
    dpi = 100
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    identity_axis, error_axis, change_axis = figure.subplots(3, 1, sharex=True)

    if evaluation.similarity is not None:
        similarity = evaluation.similarity
        identity_axis.plot(seconds, similarity, linewidth=1.0, label="cosine to reference")
        identity_axis.axhline(evaluation.threshold, color=BELOW_COLOUR, linewidth=0.8, linestyle=":",
                              label=f"threshold {evaluation.threshold:g}")
        below = np.isfinite(similarity) & (np.nan_to_num(similarity, nan=np.inf) < evaluation.threshold)
        if below.any():
            identity_axis.scatter(seconds[below], similarity[below], s=6, color=BELOW_COLOUR, zorder=3,
                                  label="below threshold")
        identity_axis.legend(fontsize=7, loc="lower right")
    else:
        _message(identity_axis, f"identity {evaluation.identity_note}", width)
    identity_axis.set_title("identity similarity", fontsize=9, loc="left")

    if evaluation.errors is not None:
        for name, errors in evaluation.errors.items():
            error_axis.plot(seconds[: errors.shape[0]], errors, linewidth=1.0, label=LABELS[name])
        error_axis.legend(fontsize=7, loc="upper right", ncol=4)
    else:
        _message(error_axis, f"expression fidelity {evaluation.fidelity_note}", width)
    error_axis.set_title("expression error (relative to the driving motion)", fontsize=9, loc="left")

    if evaluation.changes.size:
        change_axis.plot(seconds[1:], evaluation.changes, linewidth=1.0, color="#2ca02c")
    change_axis.set_title("frame-to-frame change" + ("" if evaluation.boundaries else f" ({evaluation.seam_note})"),
                          fontsize=9, loc="left")
    change_axis.set_xlabel("seconds" + (" (dashed: window boundaries)" if evaluation.boundaries else ""), fontsize=8)

    for axis in (identity_axis, error_axis, change_axis):
        for transition in evaluation.boundaries:
            axis.axvline((transition + 1) / fps, color=BOUNDARY_COLOUR, linewidth=0.8, linestyle="--")
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{count} output frames at {fps:g} fps", fontsize=10)
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3]
    return _exact_size(image, width, height)
