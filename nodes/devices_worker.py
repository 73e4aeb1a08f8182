"""Entry point of one device worker process (started by ``window_pool.WorkerPool``; not a module to import).

It makes ComfyUI importable with the server's own command-line options (attention, precision and memory flags
decide the numbers, so a worker must run with the same ones), chooses its device, imports the pack the way ComfyUI
does (a package named after its folder) and serves the coordinator until told to quit or until ComfyUI's process
is gone.
"""
import importlib
import importlib.util
import json
import sys
from pathlib import Path

def main() -> None:
    config = json.loads(sys.argv[1])
    sys.path.insert(0, config["comfyui_dir"])
    # ComfyUI parses the command line when comfy.cli_args is first imported, if asked to: parse the server's.
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.argv = [sys.argv[0], *config["comfy_argv"]]
    from comfy.cli_args import args

    # The device: a CUDA worker sees only its own GPU (CUDA_VISIBLE_DEVICES, set by the pool) as cuda:0.
    args.cpu = config["device"] == "cpu"
    args.cuda_device = None
    import torch

    torch.set_num_threads(int(config["threads"]))
    package = config["package"]
    spec = importlib.util.spec_from_file_location(package, Path(config["pack_dir"]) / "__init__.py",
                                                  submodule_search_locations=[config["pack_dir"]])
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    worker = importlib.import_module(f"{package}.nodes.window_worker")
    worker.serve(config)


if __name__ == "__main__":
    main()
