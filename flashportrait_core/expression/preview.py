"""Pictures that show whether extraction held: face boxes and points over the frames, expression curves.

`draw_face_overlay` works on IMAGE-layout tensors (boxes, the 5 points, and the dense landmarks where the face
backend has them); `plot_expression_curves` renders with matplotlib (Agg, no
display needed; imported only when called).
"""

from __future__ import annotations

import numpy as np
import torch

from .extract import ExpressionFeatures
from .pdfgc import EMO_DIM, EYE_DIM, HEADPOSE_DIM

# RGB in [0, 1]: box of a detected face, box of a frame whose points were interpolated, and one colour per point
# (left pupil, right pupil, nose tip, left and right mouth corner).
FOUND_COLOUR = (0.1, 0.9, 0.2)
FILLED_COLOUR = (1.0, 0.55, 0.0)
POINT_COLOURS = ((0.2, 0.6, 1.0), (0.2, 0.6, 1.0), (1.0, 0.2, 0.2), (1.0, 0.9, 0.1), (1.0, 0.9, 0.1))
# Dense landmarks (flashportrait's 222 points, MediaPipe's 478-point mesh, insightface's 106), under the 5 points.
LANDMARK_COLOUR = (0.0, 1.0, 1.0)
EMOTION_CURVES = 4  # emotion dimensions plotted: the ones that vary most over the video


def _frame_mapping(expressions: ExpressionFeatures, frame_count: int, frame_height: int, frame_width: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For each driving frame: the two sequence entries around its time, the weight of the later one, and the
    pixel scale (x, y) from the extraction's frames to these (None when the size is the same)."""
    total = expressions.points.shape[0]
    if expressions.source_frames < frame_count:
        raise ValueError(f"the expressions cover {expressions.source_frames} driving frames, driving_frames has "
                         f"{frame_count}; pass the frames the expressions were extracted from")
    positions = torch.arange(frame_count, dtype=torch.float64) * (expressions.fps / expressions.source_fps)
    positions = positions.clamp(max=total - 1)
    lower = positions.floor().long()
    upper = (lower + 1).clamp(max=total - 1)
    weight = (positions - lower).float()
    source_height, source_width = expressions.frame_size
    scale = None
    if source_height and source_width and (source_height, source_width) != (frame_height, frame_width):
        scale = torch.tensor([frame_width / source_width, frame_height / source_height])
    return lower, upper, weight, scale


def face_tracks_for_frames(expressions: ExpressionFeatures, frame_count: int, frame_height: int,
                           frame_width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes [N, 4], points [N, 5, 2] and found [N] for the first N = frame_count driving frames.

    Expressions converted to another frame rate are interpolated back to the driving frames' times; points are
    scaled when the frames were resized after extraction.
    """
    lower, upper, weight, scale = _frame_mapping(expressions, frame_count, frame_height, frame_width)
    points = expressions.points[lower] * (1 - weight)[:, None, None] + expressions.points[upper] * weight[:, None, None]
    boxes = expressions.boxes[lower] * (1 - weight)[:, None] + expressions.boxes[upper] * weight[:, None]
    found = expressions.found[lower] & expressions.found[upper]
    if scale is not None:
        points = points * scale
        boxes = boxes * scale.repeat(2)
    return boxes, points, found


def landmarks_for_frames(expressions: ExpressionFeatures, frame_count: int, frame_height: int,
                         frame_width: int) -> torch.Tensor | None:
    """Dense landmarks [N, K, 2] for the first N = frame_count driving frames (NaN where no face was seen), or
    None when the face backend gave none. Mapped to the frames' times and size like `face_tracks_for_frames`."""
    if expressions.landmarks is None:
        return None
    lower, upper, weight, scale = _frame_mapping(expressions, frame_count, frame_height, frame_width)
    landmarks = expressions.landmarks.float()
    mixed = landmarks[lower] * (1 - weight)[:, None, None] + landmarks[upper] * weight[:, None, None]
    # An entry of weight 0 is not read: a frame that falls on a detected frame keeps its landmarks.
    mixed = torch.where((weight <= 0)[:, None, None], landmarks[lower], mixed)
    return mixed if scale is None else mixed * scale


def _paint(frame: torch.Tensor, y0: int, y1: int, x0: int, x1: int, colour: torch.Tensor) -> None:
    height, width = frame.shape[:2]
    y0, y1, x0, x1 = max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)
    if y1 > y0 and x1 > x0:
        frame[y0:y1, x0:x1] = colour


def _paint_dots(frame: torch.Tensor, centres: torch.Tensor, radius: int, colour: torch.Tensor) -> None:
    """Square dots of side 2 * radius + 1 at pixel centres [K, 2] (x, y); NaN and off-frame parts are skipped."""
    centres = centres[torch.isfinite(centres).all(dim=1)].round().long()
    if centres.shape[0] == 0:
        return
    height, width = frame.shape[:2]
    offsets = torch.arange(-radius, radius + 1)
    xs = (centres[:, 0, None, None] + offsets[None, None, :]).expand(-1, offsets.numel(), -1).reshape(-1)
    ys = (centres[:, 1, None, None] + offsets[None, :, None]).expand(-1, -1, offsets.numel()).reshape(-1)
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    frame[ys[inside], xs[inside]] = colour


def draw_face_overlay(frames: torch.Tensor, boxes: torch.Tensor, points: torch.Tensor,
                      found: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
    """Frames [N, H, W, C] in [0, 1] -> RGB copies [N, H, W, 3] with each face box and its 5 points drawn.

    Boxes are green where the face was detected and orange where its points were interpolated. `landmarks`
    [N, K, 2] (the backend's dense landmarks, NaN where none) are drawn as small cyan dots under the 5 points.
    Line width and point size follow the frame size.
    """
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
        raise ValueError(f"frames must have shape [N, H, W, C] with C = 1, 3 or 4, got {list(frames.shape)}")
    if boxes.shape[0] != frames.shape[0] or points.shape[0] != frames.shape[0]:
        raise ValueError(f"{frames.shape[0]} frames but {boxes.shape[0]} boxes and {points.shape[0]} point sets")
    if landmarks is not None and (landmarks.ndim != 3 or landmarks.shape[0] != frames.shape[0]
                                  or landmarks.shape[2] != 2):
        raise ValueError(f"landmarks must have shape [{frames.shape[0]}, K, 2] (one set per frame), "
                         f"got {list(landmarks.shape)}")
    canvas = frames[..., :3].expand(-1, -1, -1, 3).float().clone() if frames.shape[-1] == 1 else \
        frames[..., :3].float().clone()
    height, width = canvas.shape[1:3]
    line = max(1, round(min(height, width) / 256))
    radius = max(2, round(min(height, width) / 160))
    landmark_radius = min(height, width) // 768  # one-pixel dots below 768 pixels, 3x3 up to 1535, ...
    found_colour, filled_colour = torch.tensor(FOUND_COLOUR), torch.tensor(FILLED_COLOUR)
    point_colours = torch.tensor(POINT_COLOURS)
    for index in range(canvas.shape[0]):
        frame = canvas[index]
        box = boxes[index].tolist()
        if all(np.isfinite(box)):
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            colour = found_colour if bool(found[index]) else filled_colour
            _paint(frame, y0 - line, y0 + line, x0 - line, x1 + line, colour)
            _paint(frame, y1 - line, y1 + line, x0 - line, x1 + line, colour)
            _paint(frame, y0 - line, y1 + line, x0 - line, x0 + line, colour)
            _paint(frame, y0 - line, y1 + line, x1 - line, x1 + line, colour)
        if landmarks is not None:
            _paint_dots(frame, landmarks[index].float(), landmark_radius, torch.tensor(LANDMARK_COLOUR))
        for point, colour in zip(points[index].tolist(), point_colours):
            if all(np.isfinite(point)):
                x, y = (int(round(v)) for v in point)
                _paint(frame, y - radius, y + radius + 1, x - radius, x + radius + 1, colour)
    return canvas


def expression_curves(expressions: ExpressionFeatures) -> dict[str, np.ndarray]:
    """The curves plotted, by group: head pose [T, 6], eye [T, 6], the most varying emotion dims
    [T, EMOTION_CURVES], mouth energy [T] (distance of the mouth feature from its median over the video)."""
    features = expressions.features.double().numpy()
    headpose = features[:, :HEADPOSE_DIM]
    eye = features[:, HEADPOSE_DIM:HEADPOSE_DIM + EYE_DIM]
    emotion = features[:, HEADPOSE_DIM + EYE_DIM:HEADPOSE_DIM + EYE_DIM + EMO_DIM]
    mouth = features[:, HEADPOSE_DIM + EYE_DIM + EMO_DIM:]
    varying = np.argsort(-emotion.std(axis=0), kind="stable")[:EMOTION_CURVES]
    mouth_energy = np.linalg.norm(mouth - np.median(mouth, axis=0), axis=1)
    return {"headpose": headpose, "eye": eye, "emotion": emotion[:, varying], "emotion_dims": varying,
            "mouth_energy": mouth_energy}


def plot_expression_curves(expressions: ExpressionFeatures, width: int = 1280, height: int = 960) -> np.ndarray:
    """Render the expression curves over time as an RGB uint8 image [height, width, 3].

    Four panels over time in seconds: head pose, eyes, the emotion dimensions that vary most, mouth energy.
    Frames whose face points were interpolated are shaded.
    """
    if width < 320 or height < 240:
        raise ValueError(f"plot size must be at least 320x240, got {width}x{height}")
    try:
        # The Agg canvas directly, not pyplot: no global backend switch, no display, safe in a server thread.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting expression curves needs matplotlib: pip install matplotlib") from error
    curves = expression_curves(expressions)
    total = expressions.features.shape[0]
    seconds = np.arange(total) / expressions.fps
    dpi = 100
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(4, 1, sharex=True)
    panels = [
        ("head pose", curves["headpose"], [f"pose {i}" for i in range(HEADPOSE_DIM)]),
        ("eyes", curves["eye"], [f"eye {i}" for i in range(EYE_DIM)]),
        ("emotion (most varying)", curves["emotion"], [f"emo {i}" for i in curves["emotion_dims"]]),
        ("mouth energy", curves["mouth_energy"][:, None], ["|mouth - median|"]),
    ]
    filled = np.zeros(total, dtype=bool)
    filled[expressions.filled_frames] = True
    for axis, (title, values, labels) in zip(axes, panels):
        for column, label in enumerate(labels):
            axis.plot(seconds, values[:, column], linewidth=1.0, label=label)
        for start, stop in _runs(filled):
            axis.axvspan(seconds[start] - 0.5 / expressions.fps, seconds[stop - 1] + 0.5 / expressions.fps,
                         color="orange", alpha=0.25, linewidth=0)
        axis.set_title(title, fontsize=9, loc="left")
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper right", ncol=min(len(labels), 6))
    axes[-1].set_xlabel("seconds" + (" (shaded: face points interpolated)" if filled.any() else ""), fontsize=8)
    figure.suptitle(f"{total} frames at {expressions.fps:g} fps", fontsize=10)
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3]
    return np.ascontiguousarray(image)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in a 1-d mask."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))
