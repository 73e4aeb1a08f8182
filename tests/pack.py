"""Import the pack the way ComfyUI does (as a package named after its folder) for in-process tests."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "flashportrait_pack"

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from inprocess_host import use_host_in_process  # noqa: E402


def import_pack() -> ModuleType:
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    use_host_in_process()
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    importlib.import_module(f"{PACK_NAME}.nodes")
    return module
