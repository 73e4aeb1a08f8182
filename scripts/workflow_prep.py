"""Fill a shipped FlashPortrait workflow (in API form) with a user's media, models and settings.

Shared by the main job (``scripts/animate.py``) and the graph tests, so the tests run exactly what users run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BASIC_WORKFLOW = REPO_ROOT / "workflows" / "flashportrait_basic.json"
LONG_WORKFLOW = REPO_ROOT / "workflows" / "flashportrait_long.json"

# Text and CLIP-vision encoder nodes; replaced by a precomputed conditioning file when one is given.
_ENCODER_TYPES = {"CLIPLoader", "CLIPTextEncode", "CLIPVisionLoader", "CLIPVisionEncode"}


@dataclass(frozen=True)
class ModelFiles:
    """File names (inside ComfyUI's model folders) that the workflow's loaders select."""

    wan: str
    transformer: str
    portrait_encoder: str
    expression_encoder: str
    vae: str
    text_encoder: str | None = None  # models/text_encoders
    clip_vision: str | None = None  # models/clip_vision
    precomputed_conditioning: str | None = None  # models/flashportrait_conditioning, instead of the encoders

    def folders(self) -> dict[str, str]:
        """Model folder of each file that must exist."""
        files = {self.wan: "diffusion_models", self.transformer: "flashportrait",
                 self.portrait_encoder: "flashportrait", self.expression_encoder: "flashportrait",
                 self.vae: "vae"}
        if self.precomputed_conditioning:
            files[self.precomputed_conditioning] = "flashportrait_conditioning"
        else:
            files[self.text_encoder] = "text_encoders"
            files[self.clip_vision] = "clip_vision"
        return files


PUBLISHED_MODELS = ModelFiles(
    wan="wan2.1_i2v_720p_14B_bf16.safetensors", transformer="transformer.pt",
    portrait_encoder="portrait_encoder.pt", expression_encoder="pd_fpg.pth", vae="wan_2.1_vae.safetensors",
    text_encoder="umt5_xxl_fp8_e4m3fn_scaled.safetensors", clip_vision="clip_vision_h.safetensors")

TINY_MODELS = ModelFiles(
    wan="wan2.1_i2v_tiny.safetensors", transformer="transformer_tiny.pt",
    portrait_encoder="portrait_encoder_tiny.safetensors", expression_encoder="pd_fpg_tiny.pth",
    vae="wan_2.1_vae_tiny.safetensors", precomputed_conditioning="tiny_prompt.safetensors")


@dataclass(frozen=True)
class Settings:
    seed: int = 42
    steps: int = 30
    shift: float = 5.0
    max_side: int = 720
    window_length: int = 51
    window_overlap: int = 30
    max_frames: int = 0  # 0: every driving frame
    acceleration: str = "off"  # off (the published loop), an ALP preset (quality, balanced, fast) or 4-step LoRA
    filename_prefix: str = "video/FlashPortrait"


def load_ui_workflow(path: Path = BASIC_WORKFLOW) -> dict:
    return json.loads(Path(path).read_text())


def _node_of_type(prompt: dict, class_type: str) -> tuple[str, dict]:
    found = [(node_id, node) for node_id, node in prompt.items() if node["class_type"] == class_type]
    if len(found) != 1:
        raise ValueError(f"the workflow should have exactly one {class_type} node, it has {len(found)}")
    return found[0]


def _prune_unused(prompt: dict, removable: set[str]) -> None:
    """Drop nodes of the ``removable`` types that no remaining node reads from."""
    while True:
        used = {value[0] for node in prompt.values() for value in node["inputs"].values()
                if isinstance(value, list) and len(value) == 2}
        unused = [node_id for node_id, node in prompt.items()
                  if node["class_type"] in removable and node_id not in used]
        if not unused:
            return
        for node_id in unused:
            del prompt[node_id]


def use_precomputed_conditioning(prompt: dict, conditioning_file: str) -> None:
    """Feed the sampler from FlashPortrait Load Conditioning instead of the text and CLIP-vision encoders."""
    sampler_id, sampler = _node_of_type(prompt, "FlashPortraitSampler")
    loader_id = str(max(int(node_id) for node_id in prompt if node_id.isdigit()) + 1)
    prompt[loader_id] = {"class_type": "FlashPortraitLoadConditioning",
                         "inputs": {"conditioning": conditioning_file},
                         "_meta": {"title": "Precomputed prompt and CLIP-vision conditioning"}}
    for slot, name in enumerate(("positive", "negative", "clip_vision_output")):
        sampler["inputs"][name] = [loader_id, slot]
    _prune_unused(prompt, _ENCODER_TYPES)


def _nodes_of_type(prompt: dict, class_type: str) -> list[dict]:
    return [node for node in prompt.values() if node["class_type"] == class_type]


def prepare_prompt(prompt: dict, models: ModelFiles, reference_image: str, driving_video: str,
                   settings: Settings = Settings()) -> dict:
    """Set media, models and settings on the API form of a shipped workflow (in place).

    Works for the basic workflow (Load Video + Save Video) and the long-form one (extraction from the video
    file + decode to file): each setting goes to whichever of its nodes the workflow has.
    """
    def set_inputs(class_type: str, **values) -> None:
        _node_of_type(prompt, class_type)[1]["inputs"].update(values)

    def set_if_present(class_type: str, **values) -> None:
        for node in _nodes_of_type(prompt, class_type):
            node["inputs"].update(values)

    set_inputs("FlashPortraitModelLoader", wan_model=models.wan, flashportrait_weights=models.transformer)
    set_inputs("FlashPortraitPortraitEncoderLoader", portrait_encoder=models.portrait_encoder)
    set_inputs("FlashPortraitExpressionModelLoader", expression_encoder=models.expression_encoder)
    set_inputs("VAELoader", vae_name=models.vae)
    set_inputs("LoadImage", image=reference_image)
    set_if_present("LoadVideo", file=driving_video)
    set_if_present("FlashPortraitExtractExpressions", max_frames=settings.max_frames)
    set_if_present("FlashPortraitExtractExpressionsFromVideo", video=driving_video, max_frames=settings.max_frames)
    set_inputs("FlashPortraitWindows", window_length=settings.window_length, overlap=settings.window_overlap)
    set_inputs("FlashPortraitSampler", seed=settings.seed, steps=settings.steps, shift=settings.shift,
               max_side=settings.max_side, acceleration=settings.acceleration)
    set_if_present("SaveVideo", filename_prefix=settings.filename_prefix)
    set_if_present("FlashPortraitDecodeToVideo", filename_prefix=settings.filename_prefix)
    if models.precomputed_conditioning:
        use_precomputed_conditioning(prompt, models.precomputed_conditioning)
    else:
        set_inputs("CLIPLoader", clip_name=models.text_encoder)
        set_inputs("CLIPVisionLoader", clip_name=models.clip_vision)
    return prompt


def tiny_animation_prompt(video: str, reference: str, seed: int, *, smoothing: float = 0.5, emo_cfg: float = 4.0,
                          window_length: int = 2, overlap: int = 1, steps: int = 1) -> dict:
    """The smallest whole animation in API form, on the tiny models: the first 5 frames of ``video`` (2 latent
    frames) onto ``reference`` (file names in the server's input folder), 32 px. The sampler is node "10"
    (latent output 0, report output 1) and the VAE node "4": callers add what consumes them."""
    return {
        "1": {"class_type": "FlashPortraitModelLoader",
              "inputs": {"wan_model": TINY_MODELS.wan, "flashportrait_weights": TINY_MODELS.transformer,
                         "weight_dtype": "default"}},
        "2": {"class_type": "FlashPortraitPortraitEncoderLoader",
              "inputs": {"portrait_encoder": TINY_MODELS.portrait_encoder}},
        "3": {"class_type": "FlashPortraitExpressionModelLoader",
              "inputs": {"expression_encoder": TINY_MODELS.expression_encoder, "face_backend": "mediapipe"}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": TINY_MODELS.vae}},
        "5": {"class_type": "LoadImage", "inputs": {"image": reference}},
        "6": {"class_type": "FlashPortraitExtractExpressionsFromVideo",
              "inputs": {"video": video, "expression_model": ["3", 0], "batch_size": 4, "max_frames": 5,
                         "smoothing": smoothing, "target_fps": 25.0, "path": ""}},
        "7": {"class_type": "FlashPortraitEmotionConditioning",
              "inputs": {"expressions": ["6", 0], "portrait_encoder": ["2", 0], "ip_scale": 1.0,
                         "emo_cfg": emo_cfg, "text_cfg": 1.0}},
        "8": {"class_type": "FlashPortraitWindows", "inputs": {"window_length": window_length, "overlap": overlap}},
        "9": {"class_type": "FlashPortraitLoadConditioning",
              "inputs": {"conditioning": TINY_MODELS.precomputed_conditioning}},
        "10": {"class_type": "FlashPortraitSampler",
               "inputs": {"model": ["1", 0], "positive": ["9", 0], "negative": ["9", 1],
                          "clip_vision_output": ["9", 2], "vae": ["4", 0], "reference_image": ["5", 0],
                          "emotion": ["7", 0], "windows": ["8", 0], "seed": seed, "steps": steps, "shift": 5.0,
                          "max_side": 32, "acceleration": "off", "target_speedup": 0.0, "sampler": "euler",
                          "schedule": "published", "resume": "off"}},
    }
