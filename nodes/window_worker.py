"""The worker side of window-parallel sampling: holds the model on its device and evaluates the windows the
coordinator sends, with the same ``WindowEvaluator`` the one-device path runs (see ``window_pool``)."""
from __future__ import annotations

import datetime
import os
import threading
import time
import traceback

import comfy.model_management
import comfy.model_patcher
import comfy.sampler_helpers
import comfy.samplers
import torch
import torch.distributed as dist

from ..flashportrait_core.sampling.alp import new_window_state
from ..flashportrait_core.sampling.resume import restore_window_state, window_state_dict
from .loaders import load_flashportrait_model
from .wan_runner import latent_storage_device
from .window_eval import WindowEvaluator, window_conds
from .window_pool import GLOO_TIMEOUT, TO_COORDINATOR, TO_WORKER, Channel


def watch_parent(parent: int) -> None:
    """Exit when ComfyUI's process is gone (killed without running its exit handlers): nothing is left running."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, name="flashportrait-parent-watch", daemon=True).start()


class WorkerJob:
    """One run's state on this worker: the model's window conditions, its windows' tokens and ALP states."""

    def __init__(self, model_patcher, message: dict):
        self.model_patcher = model_patcher
        plan, window_shape = message["plan"], tuple(message["window_shape"])
        conds = {name: [entry.copy() for entry in entries] for name, entries in message["conds"].items()}
        model_options = comfy.model_patcher.create_model_options_clone(model_patcher.model_options)
        # As the guider's outer_sample: the memory estimate is for one window.
        self.inner_model, conds, self.loaded_models = comfy.sampler_helpers.prepare_sampling(
            model_patcher, window_shape, conds, model_options)
        self.conds_for_cleanup = conds
        device = model_patcher.load_device
        comfy.samplers.cast_to_load_options(model_options, device=device, dtype=model_patcher.model_dtype())
        model_patcher.pre_run()
        conds = window_conds(self.inner_model, conds, message["concat"], window_shape, message["dtype"], device,
                             message["seed"])
        storage = latent_storage_device(device, plan)
        model_options = comfy.model_patcher.create_model_options_clone(model_options)
        model_options.setdefault("transformer_options", {})["sample_sigmas"] = message["sample_sigmas"].to(storage)
        self.model_options = model_options
        self.device = device
        windows = len(plan.windows)
        alp = message["alp"]
        sigmas = message["sigmas"]
        states = [new_window_state(sigmas, alp) for _ in range(windows)] if alp is not None else []
        for k, saved in message.get("window_states", {}).items():
            restore_window_state(states[k], saved)
        tokens = message["tokens"]
        self.owned = sorted(tokens)
        self.evaluator = WindowEvaluator(self.inner_model, conds, message["guidance"],
                                         lambda k, target: tokens[k].to(target), plan, sigmas, alp,
                                         tuple(message["blocks"]), device, states, [None] * windows,
                                         [0] * windows)

    def window(self, message: dict) -> dict:
        k = message["window"]
        x = message["x"].to(self.device)
        timestep = message["timestep"].to(self.device)
        prediction = self.evaluator.predict(k, x, timestep, self.model_options, message["step"])
        return {"op": "result", "window": k, "prediction": prediction.cpu(),
                "passes": self.evaluator.model_passes[k]}

    def states(self) -> dict:
        if self.evaluator.alp is None:
            return {}
        return {k: window_state_dict(self.evaluator.states[k]) for k in self.owned}

    def close(self) -> None:
        try:
            self.model_patcher.cleanup()
        finally:
            comfy.sampler_helpers.cleanup_models(self.conds_for_cleanup, self.loaded_models)


def patched_model(base, patches: dict, patches_uuid):
    """The loaded model with the coordinator MODEL's weight patches (LoRAs) on a clone, as ComfyUI's loaders do."""
    if not patches:
        return base
    model = base.clone()
    model.patches = {key: list(value) for key, value in patches.items()}
    model.patches_uuid = patches_uuid
    return model


def serve(config: dict) -> None:
    rank, world = int(config["rank"]), int(config["world"])
    watch_parent(os.getppid())
    store = dist.TCPStore("127.0.0.1", int(config["port"]), world, is_master=False,
                          timeout=datetime.timedelta(seconds=300))
    group = dist.ProcessGroupGloo(store, rank, world, GLOO_TIMEOUT)
    channel = Channel(group, 0, TO_COORDINATOR, TO_WORKER, config["coordinator_package"])
    base = None
    patched: tuple | None = None  # (uuid, model) of the last LoRA-patched clone
    job: WorkerJob | None = None
    while True:
        try:
            message = channel.receive()
        except Exception:  # the coordinator is gone
            os._exit(2)
        op = message.get("op")
        try:
            if op == "hello":
                reply = {"op": "hello", "device": str(comfy.model_management.get_torch_device()),
                         "threads": torch.get_num_threads(), "pid": os.getpid()}
            elif op == "load":
                if job is not None:
                    job.close()
                    job = None
                base, patched = None, None
                comfy.model_management.unload_all_models()
                base, _ = load_flashportrait_model(message["source"])
                reply = {"op": "ready"}
            elif op == "job":
                if job is not None:  # the previous run stopped early (interrupt, error)
                    job.close()
                    job = None
                if "patches" in message:
                    patched = (message["patches_uuid"], patched_model(base, message["patches"],
                                                                      message["patches_uuid"]))
                model = patched[1] if patched is not None and patched[0] == message["patches_uuid"] else base
                job = WorkerJob(model, message)
                reply = {"op": "ok"}
            elif op == "window":
                reply = job.window(message)
            elif op == "states":
                reply = {"op": "states", "states": job.states() if job is not None else {}}
            elif op == "end":
                if job is not None:
                    job.close()
                    job = None
                reply = {"op": "ok"}
            elif op == "quit":
                channel.send({"op": "bye"})
                return
            else:
                reply = {"op": "error", "error": f"unknown request {op!r}"}
        except Exception as error:
            reply = {"op": "error", "error": "".join(traceback.format_exception(error))[-4000:]}
            if op == "window":
                reply["window"] = message.get("window")
        channel.send(reply)
