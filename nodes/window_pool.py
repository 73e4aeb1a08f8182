"""Window-parallel sampling: device workers that evaluate windows, and ComfyUI's server process as coordinator.

Within a denoising step every window starts from the same latents and is independent of the others until the
blend. The coordinator (the guider, inside ComfyUI's sampling) sends each worker the latents of its windows, one
window at a time; the worker evaluates it with the same ``WindowEvaluator`` the one-device path runs and sends the
guided prediction back; the coordinator blends the predictions in window order, so the result is the one-device
result. The model is loaded by every worker from the files the graph's FlashPortrait Model Loader read; the
conditioning, the reference condition and each window's emotion tokens travel once per run; a window keeps its
worker for the whole run, so its ALP history never moves.

Transport: ``torch.distributed``'s gloo process group over loopback TCP, coordinator rank 0, worker ranks 1..N.
Every message is a header (the payload's size) and a payload (a ``torch.save`` archive). The coordinator never
blocks on a worker: one receiving thread per worker puts replies on a queue, and the sampling thread waits on it
while watching ComfyUI's interrupt flag, the workers' processes and a deadline, so an interrupt stops the run
after the windows in flight (at most one per worker), and a dead or stuck worker becomes an error naming its
device, after which every worker of the pool is stopped. Workers exit when ComfyUI's process does (atexit here,
and each worker watches its parent).
"""
from __future__ import annotations

import atexit
import datetime
import io
import json
import logging
import os
import pickle
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PACK_DIR = Path(__file__).resolve().parents[1]
WORKER_SCRIPT = Path(__file__).resolve().with_name("devices_worker.py")
TO_WORKER, TO_COORDINATOR = 1, 2  # gloo tags of the two directions
WORKER_PACKAGE = "flashportrait_device_worker_pack"  # the pack's package name inside a worker
# A gloo operation's own limit. Long: a worker waits for its next message as long as ComfyUI stays idle, and the
# coordinator enforces its own deadlines (DeviceSet.timeout_s) from the outside.
GLOO_TIMEOUT = datetime.timedelta(days=7)
POLL_S = 0.05


# -- messages --------------------------------------------------------------------------------------------------

# This pack's package name in this process. ComfyUI imports a pack under a name made from its folder's path, a
# worker under its own name: pickled classes of the pack (settings, the window plan) are renamed when read.
PACK_PACKAGE = __name__.rsplit(".nodes.", 1)[0]


def encode(message: dict) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(message, buffer)
    return torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)


def _renaming_pickle(sender_package: str) -> SimpleNamespace:
    """A pickle module for torch.load that reads the sender's pack classes as this process's."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if module == sender_package or module.startswith(sender_package + "."):
                module = PACK_PACKAGE + module[len(sender_package):]
            return super().find_class(module, name)

    return SimpleNamespace(Unpickler=Unpickler, load=pickle.load, __name__="pickle")


def decode(payload: torch.Tensor, sender_package: str = PACK_PACKAGE) -> dict:
    # weights_only=False: messages hold ComfyUI objects (conditioning entries, LoRA adapters). They come only from
    # this pool's own processes, over a loopback process group made for this pool.
    return torch.load(io.BytesIO(payload.numpy().tobytes()), map_location="cpu", weights_only=False,
                      pickle_module=_renaming_pickle(sender_package))


@dataclass(frozen=True)
class _RawTensor:
    """Stands in a message for a tensor sent on its own, as raw bytes after the message (no serialisation)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class Channel:
    """Messages to and from one peer of a gloo process group (whose pack is imported as ``peer_package``).

    A message is a header (the size of the rest), a ``torch.save`` archive of the message with its top-level tensors
    left out, then those tensors' bytes as they are: the window latents and predictions, which travel every step,
    skip the archive's copies (serialising a 47 MB window costs about ten times its transfer on a small CPU).
    """

    def __init__(self, group, peer: int, send_tag: int, receive_tag: int, peer_package: str = PACK_PACKAGE):
        self.group, self.peer, self.send_tag, self.receive_tag = group, peer, send_tag, receive_tag
        self.peer_package = peer_package
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, message: dict) -> None:
        raw = {name: value.detach().cpu().contiguous() for name, value in message.items()
               if isinstance(value, torch.Tensor)}
        described = {name: _RawTensor(t.dtype, tuple(t.shape), t.numel() * t.element_size())
                     for name, t in raw.items()}
        payload = encode({**message, **described})
        self.group.send([torch.tensor([payload.numel()], dtype=torch.int64)], self.peer, self.send_tag).wait()
        self.group.send([payload], self.peer, self.send_tag).wait()
        self.bytes_sent += payload.numel()
        for name, tensor in raw.items():
            if tensor.numel():
                self.group.send([tensor.reshape(-1).view(torch.uint8)], self.peer, self.send_tag).wait()
            self.bytes_sent += described[name].nbytes

    def receive(self) -> dict:
        header = torch.zeros(1, dtype=torch.int64)
        self.group.recv([header], self.peer, self.receive_tag).wait()
        payload = torch.empty(int(header[0]), dtype=torch.uint8)
        self.group.recv([payload], self.peer, self.receive_tag).wait()
        self.bytes_received += payload.numel()
        message = decode(payload, self.peer_package)
        for name, value in list(message.items()):
            if isinstance(value, _RawTensor):
                data = torch.empty(value.nbytes, dtype=torch.uint8)
                if value.nbytes:
                    self.group.recv([data], self.peer, self.receive_tag).wait()
                message[name] = data.view(value.dtype).reshape(value.shape)
                self.bytes_received += value.nbytes
        return message


# -- errors ------------------------------------------------------------------------------------------------------

class DeviceWorkerError(RuntimeError):
    """A device worker failed: it stopped, did not answer in time, or raised while evaluating a window."""


@dataclass(frozen=True)
class DeviceSet:
    """What FlashPortrait Devices hands the sampler: the devices and how their workers run."""

    devices: tuple[str, ...]
    threads: int = 0  # torch threads per CPU worker; 0: as many as ComfyUI's process uses
    timeout_s: float = 1800.0  # longest wait for one window step or a model load before a worker counts as stuck

    @property
    def parallel(self) -> bool:
        return len(self.devices) > 1


@dataclass
class _Worker:
    rank: int
    device: str
    label: str
    process: subprocess.Popen
    log_path: Path
    channel: Channel | None = None
    thread: threading.Thread | None = None
    windows_evaluated: int = 0
    busy_since: float | None = None

    def describe(self) -> str:
        return f"the worker on {self.label} (process {self.process.pid})"

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class JobStats:
    """Counts of the last run, for the status route and the tests."""

    job: int = 0  # counts the pool's runs
    windows_evaluated: int = 0
    results_after_interrupt: int = 0
    interrupted: bool = False
    bytes_sent: int = 0
    bytes_received: int = 0
    per_worker: dict[str, int] = field(default_factory=dict)


def worker_environment(device: str) -> dict[str, str]:
    """The worker's environment: ComfyUI's, except that a CUDA worker sees only its own GPU (as cuda:0)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if device.startswith("cuda:"):
        index = device.split(":", 1)[1]
        visible = [entry for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
        # cuda:N means ComfyUI's own N-th visible device, whatever CUDA_VISIBLE_DEVICES already hides.
        env["CUDA_VISIBLE_DEVICES"] = visible[int(index)] if visible and int(index) < len(visible) else index
    return env


def server_argv() -> list[str]:
    """ComfyUI's command line when this is its server (main.py parsed it), for the workers to parse the same;
    nothing in another process (a test, a script), whose command line is not ComfyUI's."""
    import comfy.options

    return list(sys.argv[1:]) if comfy.options.args_parsing else []


def comfyui_dir() -> Path:
    import comfy.model_management  # comfy is a namespace package: no __file__ of its own

    return Path(comfy.model_management.__file__).resolve().parents[1]


class WorkerPool:
    """The running workers of one DeviceSet, and the coordinator's side of the protocol."""

    def __init__(self, device_set: DeviceSet):
        from ..flashportrait_core.sampling.devices import device_labels

        self.device_set = device_set
        self.labels = device_labels(list(device_set.devices))
        self.workers: list[_Worker] = []
        self.replies: queue.Queue = queue.Queue()
        self.model_key: tuple | None = None
        self.patches_sent: list[Any] = []
        self.last_job = JobStats()
        self.log_dir = Path(tempfile.mkdtemp(prefix="flashportrait-devices-"))
        self.closed = False
        self._group = None
        self._store = None
        self._job_counter = 0

    # -- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        world = len(self.device_set.devices) + 1
        self._store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=max(60.0, self.device_set.timeout_s)))
        threads = self.device_set.threads or torch.get_num_threads()
        for index, (device, label) in enumerate(zip(self.device_set.devices, self.labels)):
            rank = index + 1
            config = {"rank": rank, "world": world, "port": self._store.port, "device": device,
                      "threads": threads, "comfyui_dir": str(comfyui_dir()), "pack_dir": str(PACK_DIR),
                      "package": WORKER_PACKAGE, "coordinator_package": PACK_PACKAGE,
                      "comfy_argv": server_argv()}
            log_path = self.log_dir / f"worker-{rank}.log"
            with open(log_path, "w") as log_handle:
                # -P: the script's folder (nodes/, with a types.py) must not shadow the standard library.
                process = subprocess.Popen([sys.executable, "-P", str(WORKER_SCRIPT), json.dumps(config)],
                                           stdin=subprocess.DEVNULL, stdout=log_handle, stderr=subprocess.STDOUT,
                                           env=worker_environment(device), cwd=str(comfyui_dir()))
            self.workers.append(_Worker(rank, device, label, process, log_path))
        atexit.register(self.close)
        # Joining the group blocks until every worker has joined: done in a thread so that a worker that dies
        # while starting is reported instead of waited for.
        made: dict = {}

        def join() -> None:
            try:
                made["group"] = dist.ProcessGroupGloo(self._store, 0, world, GLOO_TIMEOUT)
            except Exception as error:  # reported by the waiting thread below
                made["error"] = error

        joiner = threading.Thread(target=join, name="flashportrait-devices-join", daemon=True)
        joiner.start()
        deadline = time.monotonic() + self.device_set.timeout_s
        while joiner.is_alive():
            self._check_processes("while starting")
            if time.monotonic() > deadline:
                self.close(force=True)
                raise DeviceWorkerError(f"FlashPortrait Devices: the workers on {', '.join(self.labels)} did not "
                                        f"start within {self.device_set.timeout_s:.0f} s")
            joiner.join(POLL_S)
        if "error" in made:
            self.close(force=True)
            raise DeviceWorkerError(f"FlashPortrait Devices: the workers could not connect: {made['error']}")
        self._group = made["group"]
        for worker in self.workers:
            worker.channel = Channel(self._group, worker.rank, TO_WORKER, TO_COORDINATOR, WORKER_PACKAGE)
            worker.thread = threading.Thread(target=self._receive_loop, args=(worker,), daemon=True,
                                             name=f"flashportrait-devices-{worker.label}")
            worker.thread.start()
        self._request_all({"op": "hello"}, "starting")

    def _receive_loop(self, worker: _Worker) -> None:
        while True:
            try:
                message = worker.channel.receive()
            except Exception as error:  # the connection closed: the worker stopped (or the pool is closing)
                self.replies.put((worker.rank, {"op": "lost", "error": str(error).splitlines()[0]}))
                return
            self.replies.put((worker.rank, message))
            if message.get("op") == "bye":
                return

    def alive(self) -> bool:
        return not self.closed and all(worker.process.poll() is None for worker in self.workers)

    def close(self, force: bool = False) -> None:
        """Stop every worker: ask them to quit, then insist. Safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        if not force:
            for worker in self.workers:
                if worker.process.poll() is None and worker.channel is not None:
                    try:
                        worker.channel.send({"op": "quit"})
                    except Exception:
                        pass
        for worker in self.workers:
            try:
                worker.process.wait(0.0 if force else 10.0)
            except subprocess.TimeoutExpired:
                pass
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(10.0)
        for worker in self.workers:
            if worker.thread is not None:
                worker.thread.join(5.0)
        self._group = None
        self._store = None
        shutil.rmtree(self.log_dir, ignore_errors=True)  # a failure's log tail is already in its message
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    # -- waiting for workers -----------------------------------------------------------------------------------

    def _worker(self, rank: int) -> _Worker:
        return self.workers[rank - 1]

    def _check_processes(self, doing: str) -> None:
        for worker in self.workers:
            code = worker.process.poll()
            if code is not None:
                self._fail(f"FlashPortrait Devices: {worker.describe()} stopped with exit code {code} {doing}. "
                           f"Every worker of {', '.join(self.labels)} was shut down; queue the prompt again to "
                           f"restart them.", worker)

    def _fail(self, message: str, worker: _Worker | None = None) -> None:
        tail = worker.log_tail() if worker is not None else ""
        self.close(force=True)
        raise DeviceWorkerError(message + (f"\nIts last output:\n{tail}" if tail.strip() else ""))

    def _send(self, worker: _Worker, message: dict, doing: str) -> None:
        try:
            worker.channel.send(message)
        except Exception as error:
            code = worker.process.poll()
            if code is None:
                try:
                    code = worker.process.wait(2.0)
                except subprocess.TimeoutExpired:
                    code = None
            self._fail(f"FlashPortrait Devices: {worker.describe()} could not be reached {doing} "
                       f"({str(error).splitlines()[0]}; exit code {code}). Every worker was shut down; queue the "
                       f"prompt again to restart them.", worker)
        worker.busy_since = time.monotonic()

    def _next_reply(self, waiting_for: set[int], doing: str, interruptible: bool = False) -> tuple[int, dict]:
        """The next reply of one of the ``waiting_for`` workers; raises DeviceWorkerError for a dead or stuck one.
        With ``interruptible``, returns (0, {"op": "interrupt"}) when ComfyUI's interrupt flag is up."""
        import comfy.model_management

        while True:
            try:
                rank, message = self.replies.get(timeout=POLL_S)
            except queue.Empty:
                if interruptible and comfy.model_management.processing_interrupted():
                    return 0, {"op": "interrupt"}
                self._check_processes(doing)
                now = time.monotonic()
                for rank in waiting_for:
                    worker = self._worker(rank)
                    if worker.busy_since is not None and now - worker.busy_since > self.device_set.timeout_s:
                        self._fail(f"FlashPortrait Devices: {worker.describe()} did not answer within "
                                   f"{self.device_set.timeout_s:.0f} s {doing} (the timeout of FlashPortrait "
                                   f"Devices). Every worker was shut down.", worker)
                continue
            worker = self._worker(rank)
            worker.busy_since = None
            op = message.get("op")
            if op == "lost":
                try:
                    code = worker.process.wait(5.0)
                except subprocess.TimeoutExpired:
                    code = "none yet"
                self._fail(f"FlashPortrait Devices: {worker.describe()} stopped {doing} (exit code {code}; "
                           f"{message['error']}). Every worker of {', '.join(self.labels)} was shut down; queue "
                           f"the prompt again to restart them.", worker)
            if op == "error":
                error = DeviceWorkerError(f"FlashPortrait Devices: {worker.describe()} failed {doing}:\n"
                                          f"{message['error']}")
                error.rank = rank  # it answered: nothing of it is in flight any more
                raise error
            if rank in waiting_for:
                return rank, message
            log.warning("FlashPortrait Devices: unexpected %s from %s", op, worker.label)

    def _request_all(self, message: dict | list[dict], doing: str) -> dict[int, dict]:
        messages = message if isinstance(message, list) else [message] * len(self.workers)
        for worker, item in zip(self.workers, messages):
            self._send(worker, item, doing)
        waiting = {worker.rank for worker in self.workers}
        answers = {}
        while waiting:
            rank, reply = self._next_reply(waiting, doing)
            waiting.discard(rank)
            answers[rank] = reply
        return answers

    # -- the model and the runs ----------------------------------------------------------------------------------

    def ensure_model(self, source) -> None:
        """Every worker holds the model of ``source`` (loaded once; again only when the files or dtype change)."""
        key = (source.wan_path, source.flashportrait_path, source.weight_dtype)
        if self.model_key == key:
            return
        self.model_key = None
        self.patches_sent = [None] * len(self.workers)
        self._request_all({"op": "load", "source": source}, f"loading {source.wan_name}")
        self.model_key = key

    def start_job(self, setup: dict, window_tokens: Callable[[int], torch.Tensor], owners: list[int],
                  patches: dict, patches_uuid: Any) -> "PoolJob":
        """Send each worker the run's settings and its own windows' tokens (``window_tokens(k)``, made one worker
        at a time so that this process never holds the tokens of the whole video); ``owners[k]`` is window k's
        worker index."""
        self._job_counter += 1
        job_id = self._job_counter
        moved_before = self._bytes_moved()
        for index, worker in enumerate(self.workers):
            message = dict(setup, op="job", job=job_id, patches_uuid=patches_uuid,
                           tokens={k: window_tokens(k) for k, owner in enumerate(owners) if owner == index})
            if self.patches_sent[index] != patches_uuid:  # a LoRA's patches travel once, not with every run
                message["patches"] = patches
            self._send(worker, message, "preparing the run")
            del message
        waiting = {worker.rank for worker in self.workers}
        while waiting:
            rank, _ = self._next_reply(waiting, "preparing the run")
            waiting.discard(rank)
        for index in range(len(self.workers)):
            self.patches_sent[index] = patches_uuid
        self.last_job = JobStats(job=job_id, per_worker={worker.label: 0 for worker in self.workers})
        for worker in self.workers:
            worker.windows_evaluated = 0
        return PoolJob(self, job_id, owners, moved_before)

    def _bytes_moved(self) -> tuple[int, int]:
        return (sum(w.channel.bytes_sent for w in self.workers if w.channel),
                sum(w.channel.bytes_received for w in self.workers if w.channel))

    def status(self) -> dict:
        return {"devices": list(self.device_set.devices), "labels": self.labels, "alive": self.alive(),
                "closed": self.closed,
                "workers": [{"rank": w.rank, "device": w.device, "label": w.label, "pid": w.process.pid,
                             "running": w.process.poll() is None, "busy": w.busy_since is not None}
                            for w in self.workers],
                "model_loaded": self.model_key is not None,
                "last_job": vars(self.last_job)}


class PoolJob:
    """One sampling run on the pool: the windows of each step evaluated on their workers."""

    def __init__(self, pool: WorkerPool, job_id: int, owners: list[int], moved_before: tuple[int, int]):
        self.pool, self.job_id, self.owners = pool, job_id, owners
        self.moved_before = moved_before  # the pool's byte counts before this run's setup was sent
        self.model_passes: dict[int, int] = {}

    def evaluate_step(self, x: torch.Tensor, plan, step: int, timestep: torch.Tensor, first_window: int = 0,
                      frame_dim: int = 2) -> Iterator[tuple[int, torch.Tensor]]:
        """(window, guided prediction) of the windows ``first_window``.. of one step, in the order they finish.

        Each worker has one window in flight at a time, so an interrupt waits for at most one window per worker.
        """
        import comfy.model_management

        from ..flashportrait_core.sampling.loop import window_slice

        pool = self.pool
        todo = {index: deque(k for k in range(first_window, len(plan.windows)) if self.owners[k] == index)
                for index in range(len(pool.workers))}
        in_flight: dict[int, int] = {}  # rank -> window
        interrupted = False
        doing = f"at step {step + 1}"

        def dispatch(index: int) -> None:
            if interrupted or not todo[index]:
                return
            k = todo[index].popleft()
            worker = pool.workers[index]
            window_x = window_slice(x, plan, k, frame_dim).contiguous()
            pool._send(worker, {"op": "window", "job": self.job_id, "window": k, "step": step,
                                "timestep": timestep.detach().cpu(), "x": window_x.cpu()},
                       f"sending window {k} at step {step + 1}")
            in_flight[worker.rank] = k

        try:
            for index in range(len(pool.workers)):
                dispatch(index)
            while in_flight:
                try:
                    rank, message = pool._next_reply(set(in_flight), doing, interruptible=not interrupted)
                except DeviceWorkerError as error:
                    in_flight.pop(getattr(error, "rank", None), None)
                    raise
                if message["op"] == "interrupt":
                    interrupted = True  # nothing more is sent; the windows in flight finish and are dropped
                    pool.last_job.interrupted = True
                    continue
                k = in_flight.pop(rank)
                worker = pool._worker(rank)
                worker.windows_evaluated += 1
                pool.last_job.windows_evaluated += 1
                pool.last_job.per_worker[worker.label] = worker.windows_evaluated
                if interrupted:
                    pool.last_job.results_after_interrupt += 1
                    continue
                if message.get("window") != k:
                    raise DeviceWorkerError(f"FlashPortrait Devices: {worker.describe()} answered window "
                                            f"{message.get('window')} for window {k}")
                self.model_passes[k] = int(message["passes"])
                dispatch(rank - 1)
                yield k, message["prediction"]
            if interrupted:
                comfy.model_management.throw_exception_if_processing_interrupted()
                raise comfy.model_management.InterruptProcessingException()
        finally:
            self._drain(in_flight)
            sent, received = pool._bytes_moved()
            pool.last_job.bytes_sent = sent - self.moved_before[0]  # this run's: setup, windows, predictions
            pool.last_job.bytes_received = received - self.moved_before[1]

    def _drain(self, in_flight: dict[int, int]) -> None:
        """Wait out replies still in flight (the caller stopped early), so the next run starts in step."""
        pool = self.pool
        while in_flight and not pool.closed:
            try:
                rank, _ = pool._next_reply(set(in_flight), "finishing a window after the run stopped")
            except DeviceWorkerError:
                return
            in_flight.pop(rank, None)

    def window_states(self) -> dict[int, dict]:
        """Every window's ALP state (window_state_dict), gathered from the workers that own them."""
        answers = self.pool._request_all({"op": "states", "job": self.job_id}, "reporting the run")
        states: dict[int, dict] = {}
        for reply in answers.values():
            states.update(reply["states"])
        return states

    def finish(self) -> None:
        if self.pool.alive():
            self.pool._request_all({"op": "end", "job": self.job_id}, "ending the run")


# -- the pool a DeviceSet uses ------------------------------------------------------------------------------------

_lock = threading.Lock()
_active: WorkerPool | None = None


def pool_for(device_set: DeviceSet) -> WorkerPool:
    """The running pool of ``device_set``, started (or restarted after a failure) as needed. One pool runs at a
    time: another device set stops the previous pool's workers first, so no GPU holds two copies of the model."""
    global _active
    with _lock:
        if _active is not None and (_active.device_set != device_set or not _active.alive()):
            _active.close(force=not _active.alive())
            _active = None
        if _active is None:
            pool = WorkerPool(device_set)
            pool.start()
            _active = pool
        return _active


def active_pool() -> WorkerPool | None:
    return _active


def shutdown() -> None:
    """Stop the running pool's workers (ComfyUI's exit, or a test)."""
    global _active
    with _lock:
        if _active is not None:
            _active.close()
            _active = None


atexit.register(shutdown)
