"""Evaluation of an output video: identity against the reference portrait, expression fidelity against the driving
performance, seams where sampling windows meet; a plot and a report naming the worst stretches."""

from .identity import RecognitionModel, RecognitionModelNotFoundError, find_recognition_model, recognition_models
from .monitor import Evaluation, evaluate_output
from .plot import plot_evaluation
from .report import evaluation_report

__all__ = [
    "Evaluation",
    "RecognitionModel",
    "RecognitionModelNotFoundError",
    "evaluate_output",
    "evaluation_report",
    "find_recognition_model",
    "plot_evaluation",
    "recognition_models",
]
