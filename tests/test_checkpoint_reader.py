"""Checkpoint files read tensor by tensor: every format gives the saved tensors, a damaged file names itself, and
copying a file's tensors into a model holds one copy of the weights, not two."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashportrait_core.weights.reader import CheckpointError, open_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
            "b.fp8": torch.randn(4, 4, generator=gen).to(torch.float8_e4m3fn),
            "c.int": torch.arange(7, dtype=torch.int64), "d.empty": torch.zeros(0, 3), "e.scalar": torch.tensor(2.5)}


@pytest.mark.parametrize("kind", ["safetensors", "zip", "legacy"])
def test_every_format_gives_the_saved_tensors(tmp_path, kind):
    tensors = _tensors()
    if kind == "legacy":  # the legacy format predates bfloat16 and float8 storages
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    path = tmp_path / ("t.safetensors" if kind == "safetensors" else "t.pt")
    if kind == "safetensors":
        save_file(tensors, str(path), metadata={"source": "test"})
    else:
        torch.save({"state_dict": tensors}, path, _use_new_zipfile_serialization=kind == "zip")
    with open_checkpoint(path) as reader:
        meta = reader.meta()
        assert list(meta) == list(reader.keys()) and set(meta) == set(tensors)
        for key, tensor in tensors.items():
            assert meta[key].device.type == "meta"
            assert (meta[key].shape, meta[key].dtype) == (tensor.shape, tensor.dtype)
            read = reader.read(key)
            assert read.dtype == tensor.dtype and torch.equal(read.reshape(-1).view(torch.uint8),
                                                        tensor.reshape(-1).view(torch.uint8))
            reader.release([key])
        if kind == "safetensors":
            assert reader.metadata == {"source": "test"}
    expected_access = {"safetensors": "safetensors, memory-mapped", "zip": "torch zip, memory-mapped",
                       "legacy": "legacy torch pickle, read whole"}[kind]
    assert reader.access.startswith(expected_access)


def test_damaged_safetensors_files_name_themselves(tmp_path):
    save_file({"w": torch.zeros(64, 64)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors is not a readable safetensors file \(tensor 'w' "
                                              r"ends at byte 16384 of 16284\); it may be truncated"):
        open_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "header.safetensors").write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="header.safetensors .*header of"):
        open_checkpoint(tmp_path / "header.safetensors")
    header_bytes = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_bytes])
    header["w"]["shape"] = [64, 65]
    forged = json.dumps(header).encode()
    (tmp_path / "shape.safetensors").write_bytes(len(forged).to_bytes(8, "little") + forged + data[8 + header_bytes:])
    with pytest.raises(CheckpointError, match=r"tensor 'w' takes 16384 bytes, its shape \[64, 65\] needs 16640"):
        open_checkpoint(tmp_path / "shape.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt is an empty file \(0 bytes\)"):
        open_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        open_checkpoint(tmp_path)


# Copies every tensor of a file into preallocated "model" tensors the way the model loader does (read one, copy it,
# release it) and prints the peak resident memory that the copy added, in bytes. ``naive`` reads the file as
# ``safetensors.torch.load_file`` / ``torch.load(mmap=True)`` do and keeps the mapping until the end, as a contrast.
_COPY_CHILD = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from flashportrait_core.weights.reader import open_checkpoint

    def status(field):
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024

    path, mode = Path(sys.argv[1]), sys.argv[2]
    with open_checkpoint(path) as reader:
        model = {k: torch.empty(m.shape, dtype=m.dtype) for k, m in reader.meta().items()}
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the current size
    before = status("VmRSS")
    if mode == "lazy":
        with open_checkpoint(path) as reader:
            for key, target in model.items():
                target.copy_(reader.read(key))
                reader.release([key])
    else:
        from safetensors.torch import load_file
        source = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, mmap=True,
                                                                                         weights_only=True)
        for key, target in model.items():
            target.copy_(source[key])
    print(status("VmHWM") - before)
""")


def _peak_added(path: Path, mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", _COPY_CHILD, str(path), mode], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident size from /proc")
@pytest.mark.parametrize("kind", ["safetensors", "zip"])  # a legacy pickle is read whole (the report says so)
def test_copying_a_file_into_a_model_holds_a_single_copy(tmp_path, kind):
    # 24 tensors of 8 MiB (192 MiB): the model's copy is 1x the file; one tensor more is the reader's working set.
    tensors = {f"blocks.{i}.weight": torch.full((2048, 1024), float(i)) for i in range(24)}
    path = tmp_path / ("big.safetensors" if kind == "safetensors" else "big.pt")
    if kind == "safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    weights = sum(t.nbytes for t in tensors.values())
    del tensors
    lazy = _peak_added(path, "lazy")
    assert lazy <= weights * 1.1 + (16 << 20), f"{kind}: {lazy / weights:.2f}x the weights"
    # The same copy from a memory map that keeps the file's pages (what loading did before) measures 2x.
    naive = _peak_added(path, "naive")
    assert naive >= weights * 1.8, f"{kind}: the contrast read only {naive / weights:.2f}x the weights"


def test_tensors_at_unaligned_offsets_are_read(tmp_path):
    # Older writers did not pad the header to 8 bytes: a bf16 tensor may then start at an odd byte.
    values = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}).encode()
    header += b" " * ((1 - len(header)) % 2)  # an odd length: the data starts at an odd offset
    assert (8 + len(header)) % 2 == 1
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + values.view(torch.uint8).numpy().tobytes())
    with open_checkpoint(path) as reader:
        assert torch.equal(reader.read("w"), values)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's mappings from /proc")
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_tensors_outlive_the_reader_and_the_map_goes_with_them(tmp_path, suffix):
    path = tmp_path / f"kept{suffix}"
    values = torch.arange(300_000, dtype=torch.float32)
    save_file({"w": values}, str(path)) if suffix == ".safetensors" else torch.save({"w": values}, path)
    with open_checkpoint(path) as reader:
        kept = reader.read("w")

    def mapped() -> bool:
        with open("/proc/self/maps") as maps:
            return any(line.rstrip("\n").endswith(str(path.resolve())) for line in maps)

    assert torch.equal(kept, values) and mapped()  # still readable after the reader closed
    del kept
    assert not mapped()
