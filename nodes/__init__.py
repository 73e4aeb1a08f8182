"""ComfyUI glue: node classes over ``flashportrait_core``."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .conditioning import (FlashPortraitEmotionConditioning, FlashPortraitLoadConditioning,
                           FlashPortraitSaveConditioning)
from .decode import FlashPortraitDecodeToVideo
from .evaluate import FlashPortraitEvaluate
from .expression_edit import (FlashPortraitCombineExpressions, FlashPortraitEditExpressions,
                              FlashPortraitRetimeExpressions)
from .expression_files import FlashPortraitLoadExpressions, FlashPortraitSaveExpressions
from .guider_nodes import FlashPortraitGuiderNode, FlashPortraitSchedule
from .expressions import (FlashPortraitExtractExpressions, FlashPortraitExtractExpressionsFromVideo,
                          FlashPortraitPlotExpressions, FlashPortraitPreviewFaces)
from .loaders import (FlashPortraitExpressionModelLoader, FlashPortraitModelLoader,
                      FlashPortraitPortraitEncoderLoader)
from .model_folders import register_model_folders
from .routes import register_routes
from .sampler import FlashPortraitSampler
from .windows import FlashPortraitWindows


class FlashPortraitExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # Called once while the server loads the pack (this host calls no on_load): the window-plan route
        # of web/flashportrait.js goes in before the server freezes its routes.
        register_routes()
        return [
            FlashPortraitModelLoader,
            FlashPortraitPortraitEncoderLoader,
            FlashPortraitExpressionModelLoader,
            FlashPortraitExtractExpressions,
            FlashPortraitExtractExpressionsFromVideo,
            FlashPortraitPreviewFaces,
            FlashPortraitPlotExpressions,
            FlashPortraitEditExpressions,
            FlashPortraitCombineExpressions,
            FlashPortraitRetimeExpressions,
            FlashPortraitSaveExpressions,
            FlashPortraitLoadExpressions,
            FlashPortraitEmotionConditioning,
            FlashPortraitWindows,
            FlashPortraitSampler,
            FlashPortraitGuiderNode,
            FlashPortraitSchedule,
            FlashPortraitDecodeToVideo,
            FlashPortraitSaveConditioning,
            FlashPortraitLoadConditioning,
            FlashPortraitEvaluate,
        ]



