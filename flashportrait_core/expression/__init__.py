"""Driving video -> per-frame PD-FGC expression features (face points, 5-point alignment, FanEncoder).

MediaPipe is imported only when its backend is built (`MediaPipeFaceBackend`).
"""

from .alignment import align_face_crops, similarity_to_template, template_points, umeyama_similarity
from .extract import ExpressionFeatures, extract_expression_features, extract_expression_features_from_video
from .face_track import FaceBackend, FaceTrack
from .pdfgc import FEATURE_DIM, FanEncoder, expression_features, load_fan_encoder, random_fan_encoder_state_dict
from .resample import resample_expressions
from .smoothing import point_jitter, smooth_sequence
from .video import VideoInfo, VideoReadError, iter_video_chunks, probe_video, read_video_frames

__all__ = [
    "FEATURE_DIM",
    "ExpressionFeatures",
    "FaceBackend",
    "FaceTrack",
    "FanEncoder",
    "VideoInfo",
    "VideoReadError",
    "align_face_crops",
    "expression_features",
    "extract_expression_features",
    "extract_expression_features_from_video",
    "iter_video_chunks",
    "load_fan_encoder",
    "point_jitter",
    "probe_video",
    "random_fan_encoder_state_dict",
    "read_video_frames",
    "resample_expressions",
    "similarity_to_template",
    "smooth_sequence",
    "template_points",
    "umeyama_similarity",
]
