"""Seam check: is the frame-to-frame change where sampling windows meet larger than inside the windows?

The sampler runs overlapping windows of latent frames and cross-fades them; a seam shows as a jump between two
consecutive frames at a latent frame where a window starts or ends. Latent frame f >= 1 decodes to video frames
4f - 3 .. 4f (latent frame 0 to frame 0, the reference), so the change that crosses into latent frame b is the one
from decoded frame 4b - 4 to 4b - 3. Each boundary's change is compared with the median change of the
non-boundary frame pairs around it (within NEIGHBOURHOOD frames), which follows the motion of the video there.
"""

from __future__ import annotations

import numpy as np
import torch

from ..conditioning.emotion_tokens import TEMPORAL_STRIDE, num_latent_frames, trim_to_4k_plus_1
from ..sampling.windows import WindowPlan, plan_windows

NEIGHBOURHOOD = 8  # frames on each side a boundary is compared with
SEAM_RATIO = 2.0  # a boundary whose change exceeds the nearby median by this factor is reported as a seam
_TINY_CHANGE = 1e-6


class FrameChanges:
    """The mean absolute difference (colour values in [0, 1]) between each frame and the next, fed chunk by chunk
    (uint8, or float in [0, 1]); only the last frame of the previous chunk is kept.

    Frame by frame into reused buffers (whole-chunk temporaries of varying size grew the process's memory with
    the video's length), in NumPy: these small element-wise steps ran ~90x faster there than in torch on a busy
    2-core CPU."""

    def __init__(self) -> None:
        self._last: np.ndarray | None = None
        self._difference: np.ndarray | None = None
        self._values: list[float] = []

    def add(self, chunk: torch.Tensor) -> None:
        frames = chunk[..., :3].detach().cpu().numpy()
        scale = 255.0 if frames.dtype == np.uint8 else 1.0
        work_dtype = np.int16 if frames.dtype == np.uint8 else np.float32
        for frame in frames:
            if self._last is None:
                self._last = np.empty(frame.shape, dtype=frame.dtype)
                self._difference = np.empty(frame.shape, dtype=work_dtype)
            else:
                np.subtract(frame, self._last, out=self._difference, dtype=work_dtype)
                np.abs(self._difference, out=self._difference)
                total = float(self._difference.sum(dtype=np.float64))
                self._values.append(total / (self._difference.size * scale))
            np.copyto(self._last, frame)

    @property
    def values(self) -> np.ndarray:
        """[frames - 1]: entry t is the change from frame t to frame t + 1."""
        return np.asarray(self._values, dtype=np.float64)


def output_plan(frame_count: int, first_decoded_frame: int, window_length: int, overlap: int) -> WindowPlan:
    """The sampler's window plan for an output of `frame_count` frames whose first is decoded frame
    `first_decoded_frame` (1 when the reference frame was dropped)."""
    decoded = trim_to_4k_plus_1(frame_count + first_decoded_frame)
    return plan_windows(num_latent_frames(decoded), window_length, overlap)


def boundary_transitions(plan: WindowPlan, frame_count: int, first_decoded_frame: int) -> list[int]:
    """Output frame pairs (t: frame t -> t + 1) that cross into a latent frame where a window starts or the
    previous one ends."""
    borders = sorted({start for start, _ in plan.windows[1:]} | {end for _, end in plan.windows[:-1]})
    transitions = [TEMPORAL_STRIDE * border - TEMPORAL_STRIDE - first_decoded_frame for border in borders]
    return [t for t in transitions if 0 <= t < frame_count - 1]


def seam_ratios(changes: np.ndarray, transitions: list[int], neighbourhood: int = NEIGHBOURHOOD) -> list[float]:
    """Each boundary's change over the median change of the non-boundary pairs within `neighbourhood` frames."""
    inside = np.ones(changes.shape[0], dtype=bool)
    inside[transitions] = False
    ratios = []
    for t in transitions:
        low, high = max(0, t - neighbourhood), min(changes.shape[0], t + neighbourhood + 1)
        nearby = changes[low:high][inside[low:high]]
        reference = float(np.median(nearby)) if nearby.size else float(np.median(changes))
        ratios.append(float(changes[t]) / max(reference, _TINY_CHANGE))
    return ratios
