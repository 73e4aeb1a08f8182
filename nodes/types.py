"""Socket types of the pack, shared by its nodes."""
from comfy_api.latest import io

ExpressionModel = io.Custom("FLASHPORTRAIT_EXPRESSION_MODEL")  # PD-FGC encoder + face backend choice
Expressions = io.Custom("FLASHPORTRAIT_EXPRESSIONS")  # per-frame 554-d features, points, boxes, validity
PortraitEncoder = io.Custom("FLASHPORTRAIT_PORTRAIT_ENCODER")
EmotionConditioning = io.Custom("FLASHPORTRAIT_EMOTION")  # emotion tokens per latent frame + guidance
WindowSettings = io.Custom("FLASHPORTRAIT_WINDOWS")  # window length and overlap in latent frames
Devices = io.Custom("FLASHPORTRAIT_DEVICES")  # device workers for window-parallel sampling
