"""FlashPortrait for ComfyUI: ID-preserving, infinite-length portrait animation.

Importing the package has no side effects; ComfyUI calls ``comfy_entrypoint`` to register the nodes.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import FlashPortraitExtension, register_model_folders

    register_model_folders()
    return FlashPortraitExtension()
