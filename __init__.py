"""FlashPortrait for ComfyUI: ID-preserving, infinite-length portrait animation."""
from .nodes import FlashPortraitExtension, register_model_folders

WEB_DIRECTORY = "./web"

register_model_folders()


async def comfy_entrypoint() -> FlashPortraitExtension:
    return FlashPortraitExtension()
