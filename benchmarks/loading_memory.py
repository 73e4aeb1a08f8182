"""Peak host memory of the FlashPortrait Model Loader on checkpoints of several GB, now and before the lazy loader.

The DiT files are written by ``scripts/make_tiny_models.py`` at a chosen width, format-faithful (Wan base as
safetensors, FlashPortrait file as a torch zip pickle nested under ``state_dict``); the default is the Wan 2.1
1.3B shape with image conditioning (dim 1536, 30 blocks, FFN 8960), emotion tokens of 2048, bf16: a 3.1 GB Wan
file, a 1.8 GB overlay and a 3.5 GB FlashPortrait file that holds the whole DiT. Two cases:

* overlay: the Wan base plus the FlashPortrait overlay (fine-tuned attention + emotion projections).
* complete: the FlashPortrait file holds the whole DiT (the new loader reads no base; the old one is given the
  Wan file too, as it needs one).

Each load runs in a fresh process, in ComfyUI's own model classes (in-process host, weights kept in bf16 as on a
GPU: ComfyUI's ``--bf16-unet``, since on a CPU it would store float32, twice the files). "Peak added" is the
process's peak resident size during the load minus its size just before (Linux ``VmHWM`` after resetting it),
so imports do not count. "Before" is the loader of commit ``--old-commit`` (the last one before the lazy loader),
extracted with ``git archive`` and imported as its own package in its child process: the same files, the same run.

    .venv/bin/python benchmarks/loading_memory.py [--dim 1536 --blocks 30 --ffn-dim 8960 --token-dim 2048]
        [--old-commit 7ce0ddb] [--out benchmarks/out/loading_memory] [--repeats 1]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "7ce0ddb"  # main before the lazy loader: load_state_dict of both files + load_diffusion_model_state_dict


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1]) * 1024


def _import_pack(pack_dir: Path):
    spec = importlib.util.spec_from_file_location("flashportrait_pack", pack_dir / "__init__.py",
                                                  submodule_search_locations=[str(pack_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["flashportrait_pack"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("flashportrait_pack.nodes")


def child(pack_dir: Path, models_dir: Path, wan: str, weights: str) -> dict:
    """One load in this process; returns its measurements."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from inprocess_host import use_host_in_process

    use_host_in_process()
    from comfy.cli_args import args

    args.bf16_unet = True
    import folder_paths

    nodes = _import_pack(pack_dir)
    for folder in ("diffusion_models", "flashportrait"):
        folder_paths.add_model_folder_path(folder, str(models_dir / folder))
    nodes.register_model_folders()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM starts again from the current size
    before = _status("VmRSS")
    start = time.perf_counter()
    model = nodes.loaders.FlashPortraitModelLoader.execute(wan, weights, "default").result[0]
    seconds = time.perf_counter() - start
    peak, after = _status("VmHWM") - before, _status("VmRSS") - before
    state = model.model.state_dict()
    return {"peak_added": peak, "kept": after, "seconds": seconds,
            "model_bytes": sum(t.nbytes for t in state.values()),
            "dtype": str(state["diffusion_model.blocks.0.ffn.0.weight"].dtype).removeprefix("torch.")}


def _old_pack(commit: str, out_dir: Path) -> Path:
    target = out_dir / f"pack_{commit}"
    if not (target / "__init__.py").is_file():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", commit],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def _models(args, models_dir: Path) -> dict[str, Path]:
    stamp = models_dir / "written-with.json"
    wanted = {"dim": args.dim, "blocks": args.blocks, "ffn_dim": args.ffn_dim, "token_dim": args.token_dim}
    stem = f"dim{args.dim}x{args.blocks}"
    paths = {"wan": models_dir / "diffusion_models" / f"wan2.1_i2v_{stem}.safetensors",
             "transformer": models_dir / "flashportrait" / f"transformer_{stem}.pt",
             "transformer_complete": models_dir / "flashportrait" / f"transformer_complete_{stem}.pt"}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted and all(p.is_file() for p in paths.values())):
        print(f"writing the checkpoints into {models_dir} ...", flush=True)
        subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_tiny_models.py"), "--out", str(models_dir),
                        "--dit-dim", str(args.dim), "--dit-blocks", str(args.blocks), "--dit-ffn-dim",
                        str(args.ffn_dim), "--token-dim", str(args.token_dim), "--dtype", "bfloat16", "--complete"],
                       check=True)
        stamp.write_text(json.dumps(wanted))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--ffn-dim", type=int, default=8960)
    parser.add_argument("--token-dim", type=int, default=2048)
    parser.add_argument("--old-commit", default=OLD_COMMIT)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "out" / "loading_memory")
    parser.add_argument("--repeats", type=int, default=1, help="loads per case and loader (seconds: the median)")
    parser.add_argument("--child", nargs=4, metavar=("PACK", "MODELS", "WAN", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        pack, models, wan, weights = args.child
        print(json.dumps(child(Path(pack), Path(models), wan, weights)))
        return

    models_dir = args.out / "models"
    paths = _models(args, models_dir)
    loaders = {"now": REPO_ROOT, f"before ({args.old_commit})": _old_pack(args.old_commit, args.out)}
    cases = {  # case -> {loader: (wan_model, flashportrait_weights, files it reads)}
        "overlay": {name: (paths["wan"].name, paths["transformer"].name, [paths["wan"], paths["transformer"]])
                    for name in loaders},
        "complete": {"now": ("none", paths["transformer_complete"].name, [paths["transformer_complete"]]),
                     f"before ({args.old_commit})": (paths["wan"].name, paths["transformer_complete"].name,
                                                     [paths["wan"], paths["transformer_complete"]])},
    }
    gib = 2 ** 30
    print(f"DiT dim {args.dim}, {args.blocks} blocks, FFN {args.ffn_dim}, emotion tokens {args.token_dim}, bf16; "
          f"files: " + ", ".join(f"{p.name} {p.stat().st_size / gib:.2f} GiB" for p in paths.values()))
    header = (f"{'case':9s} {'loader':17s} {'files read':>10s} {'model':>7s} {'peak added':>10s} {'/ files':>7s} "
              f"{'/ model':>7s} {'kept':>6s} {'seconds':>7s}")
    print(header)
    for case, runs in cases.items():
        for loader, (wan, weights, files) in runs.items():
            results = []
            for _ in range(args.repeats):
                done = subprocess.run([sys.executable, __file__, "--child", str(loaders[loader]), str(models_dir),
                                       wan, weights], capture_output=True, text=True, cwd=REPO_ROOT)
                if done.returncode != 0:
                    raise SystemExit(f"{case} / {loader} failed:\n{done.stderr[-4000:]}")
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            file_bytes = sum(p.stat().st_size for p in files)
            peak = max(r["peak_added"] for r in results)
            model = results[0]["model_bytes"]
            print(f"{case:9s} {loader:17s} {file_bytes / gib:8.2f} G {model / gib:5.2f} G {peak / gib:8.2f} G "
                  f"{peak / file_bytes:6.2f}x {peak / model:6.2f}x {results[0]['kept'] / gib:4.2f} G "
                  f"{statistics.median(r['seconds'] for r in results):7.1f}", flush=True)
    print("files read: the files the loader opens; model: the weights of the loaded model "
          f"({results[0]['dtype']}); kept: resident growth that remains after loading")


if __name__ == "__main__":
    main()
