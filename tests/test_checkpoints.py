"""Reading checkpoints safely and recognising what they are."""
from __future__ import annotations

import hashlib
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flashportrait_core.weights.checkpoints import (BASE, FLASHPORTRAIT, CheckpointError, convert_to_safetensors,
                                                    describe_dit, flashportrait_holds_complete_dit,
                                                    identify_checkpoint, load_state_dict, merge_flashportrait_dit,
                                                    missing_wan_i2v_keys, plan_flashportrait_dit, scaled_fp8_format,
                                                    split_emotion_projections, strip_dit_prefix, wan_i2v_keys)
from flashportrait_core.weights import checkpoints
from scripts import convert_checkpoint as convert_cli


def _dit(blocks=2, dim=8, in_dim=36, i2v=True):
    sd = {"head.modulation": torch.zeros(1, 2, dim), "patch_embedding.weight": torch.zeros(dim, in_dim, 1, 2, 2)}
    for i in range(blocks):
        sd[f"blocks.{i}.self_attn.q.weight"] = torch.full((dim, dim), float(i))
        sd[f"blocks.{i}.ffn.0.weight"] = torch.zeros(4 * dim, dim)
        if i2v:
            sd[f"blocks.{i}.cross_attn.k_img.weight"] = torch.zeros(dim, dim)
    return sd


def _overlay(blocks=2, dim=8, token_dim=4):
    sd = {f"blocks.{i}.self_attn.q.weight": torch.full((dim, dim), 10.0 + i) for i in range(blocks)}
    for i in range(blocks):
        sd[f"blocks.{i}.cross_attn.emo_k_proj.weight"] = torch.ones(dim, token_dim)
        sd[f"blocks.{i}.cross_attn.emo_v_proj.weight"] = torch.ones(dim, token_dim) * 2
    return sd


class WritesMarker:
    """A pickle payload: unpickling it would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "payload_ran"
    bad = tmp_path / "transformer.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": WritesMarker(marker)}, bad)
    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict(bad)
    assert not marker.exists()
    legacy = tmp_path / "legacy.pth"
    with open(legacy, "wb") as handle:
        pickle.dump(WritesMarker(marker), handle)
    with pytest.raises(CheckpointError):
        load_state_dict(legacy)
    assert not marker.exists()


def test_nested_pickle_and_safetensors_give_the_same_tensors(tmp_path):
    sd = _overlay()
    torch.save({"state_dict": sd}, tmp_path / "t.pt")
    save_file(sd, str(tmp_path / "t.safetensors"))
    a, b = load_state_dict(tmp_path / "t.pt"), load_state_dict(tmp_path / "t.safetensors")
    assert a.keys() == b.keys() == sd.keys()
    assert all(torch.equal(a[k], b[k]) for k in sd)


def test_truncated_and_missing_files_name_the_file(tmp_path):
    save_file(_overlay(), str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_state_dict(tmp_path / "cut.safetensors")
    torch.save({"a": torch.zeros(3)}, tmp_path / "full.pt")
    raw = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_state_dict(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "absent.pt")


def test_prefixes_and_architecture():
    prefixed = {f"model.diffusion_model.{k}": v for k, v in _dit().items()}
    bare = strip_dit_prefix(prefixed)
    assert describe_dit(bare) == {"dim": 8, "num_blocks": 2, "ffn_dim": 32, "in_dim": 36, "image_to_video": True}
    wan, emotion = split_emotion_projections(_overlay())
    assert set(emotion) == {0, 1} and set(emotion[0]) == {"emo_k_proj", "emo_v_proj"}
    assert not any("emo_" in k for k in wan)


def test_overlay_replaces_base_weights_and_returns_projections():
    merged, emotion = merge_flashportrait_dit(_dit(), _overlay())
    assert torch.equal(merged["blocks.1.self_attn.q.weight"], torch.full((8, 8), 11.0))
    assert torch.equal(merged["blocks.1.ffn.0.weight"], torch.zeros(32, 8))
    assert torch.equal(emotion[1]["emo_v_proj"], torch.ones(8, 4) * 2)


def test_wrong_files_are_named_with_what_was_expected():
    with pytest.raises(CheckpointError, match="text-to-video"):
        merge_flashportrait_dit(_dit(in_dim=16, i2v=False), _overlay(), wan_name="wan_t2v.safetensors")
    with pytest.raises(CheckpointError, match="not a Wan DiT"):
        merge_flashportrait_dit({"conv_in.weight": torch.zeros(1)}, _overlay(), wan_name="sdxl.safetensors")
    with pytest.raises(CheckpointError, match="3 blocks"):
        merge_flashportrait_dit(_dit(blocks=3), _overlay(blocks=2))
    with pytest.raises(CheckpointError, match="do not fit"):
        merge_flashportrait_dit(_dit(dim=16), _overlay(dim=8))


def test_identify_names_what_a_file_holds():
    assert identify_checkpoint(_overlay()) == "a FlashPortrait transformer"
    assert identify_checkpoint(_dit()) == "a Wan 2.1 image-to-video DiT"
    assert identify_checkpoint(_dit(in_dim=16, i2v=False)) == "a Wan text-to-video DiT"
    assert identify_checkpoint({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(1)}) == "a LoRA"
    assert identify_checkpoint({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}).startswith(
        "a Stable Diffusion")
    with pytest.raises(CheckpointError, match="is a LoRA, not a Wan DiT"):
        merge_flashportrait_dit({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(1)}, _overlay(),
                                wan_name="my_lora.safetensors")
    with pytest.raises(CheckpointError, match="is a Wan 2.1 image-to-video DiT, not a FlashPortrait"):
        merge_flashportrait_dit(_dit(), _dit(), flashportrait_name="wan_again.safetensors")


def test_converter_round_trip_with_metadata(tmp_path):
    source = tmp_path / "transformer.pt"
    torch.save({"state_dict": _overlay()}, source)
    target = convert_to_safetensors(source)
    assert target == tmp_path / "transformer.safetensors"
    converted = load_state_dict(target)
    assert converted.keys() == _overlay().keys()
    assert all(torch.equal(converted[k], v) for k, v in _overlay().items())
    with safe_open(str(target), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert metadata["architecture"] == "a FlashPortrait transformer"
    assert not list(tmp_path.glob("*.partial"))


def test_converter_cli_refuses_a_malicious_pickle(tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    bad = tmp_path / "bad.pt"
    torch.save({"payload": WritesMarker(marker)}, bad)
    assert convert_cli.main([str(bad)]) == 1
    assert "refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "bad.safetensors").exists()


def test_failed_conversion_leaves_no_partial_file(tmp_path, monkeypatch):
    torch.save(_overlay(), tmp_path / "t.pt")

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        convert_to_safetensors(tmp_path / "t.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.pt"]


def _complete_dit(blocks=2, dim=8, token_dim=4):
    """Every Wan 2.1 I2V key (shapes do not matter to the layout) plus the emotion projections: meta tensors."""
    sd = {k: torch.empty(dim, dim, device="meta") for k in wan_i2v_keys(blocks)}
    sd["head.modulation"] = torch.empty(1, 2, dim, device="meta")
    sd["patch_embedding.weight"] = torch.empty(dim, 36, 1, 2, 2, device="meta")
    for i in range(blocks):
        for name in ("emo_k_proj", "emo_v_proj"):
            sd[f"blocks.{i}.cross_attn.{name}.weight"] = torch.empty(dim, token_dim, device="meta")
    return sd


def test_a_complete_flashportrait_file_needs_no_base():
    complete = {f"model.diffusion_model.{k}": v for k, v in _complete_dit().items()}
    assert flashportrait_holds_complete_dit(complete)
    layout = plan_flashportrait_dit(complete, None, flashportrait_name="full.pt")
    assert layout.complete and layout.overlaid == len(layout.weights) == len(wan_i2v_keys(2))
    assert layout.weights["blocks.1.ffn.0.weight"] == (FLASHPORTRAIT, "model.diffusion_model.blocks.1.ffn.0.weight")
    assert layout.emotion[1]["emo_v_proj"] == "model.diffusion_model.blocks.1.cross_attn.emo_v_proj.weight"
    assert layout.describe("none", "full.pt") == ("full.pt holds a complete Wan 2.1 I2V DiT (87 weights) and emotion "
                                                  "attention in 2 blocks; no Wan base file is read")
    # One weight short and the file is an overlay: without a base it is refused, naming what is missing.
    partial = {k: v for k, v in complete.items() if k != "model.diffusion_model.blocks.1.ffn.2.bias"}
    assert not flashportrait_holds_complete_dit(partial)
    assert missing_wan_i2v_keys(strip_dit_prefix(partial), 2) == ["blocks.1.ffn.2.bias"]
    with pytest.raises(CheckpointError, match=r"part.pt holds only part of the Wan DiT \(86 weights, 1 missing, "
                                              r"e\.g\. \['blocks\.1\.ffn\.2\.bias'\]\): select the Wan 2\.1 I2V "
                                              r"14B model in wan_model"):
        plan_flashportrait_dit(partial, None, flashportrait_name="part.pt")
    with pytest.raises(CheckpointError, match=r"holds only part of the Wan DiT \(2 weights, 85 missing"):
        plan_flashportrait_dit(_overlay(), None)


def test_overlay_layout_reads_each_weight_from_one_file():
    layout = plan_flashportrait_dit(_overlay(), _dit(), wan_name="wan.safetensors", flashportrait_name="fp.pt")
    assert not layout.complete
    assert layout.weights["blocks.0.self_attn.q.weight"] == (FLASHPORTRAIT, "blocks.0.self_attn.q.weight")
    assert layout.weights["blocks.0.ffn.0.weight"] == (BASE, "blocks.0.ffn.0.weight")
    assert layout.describe("wan.safetensors", "fp.pt") == (
        "fp.pt laid over wan.safetensors: 2 of 8 weights from fp.pt, the other 6 from wan.safetensors; emotion "
        "attention in 2 blocks")


def test_scaled_fp8_base_is_refused_naming_what_to_use():
    scaled = {**_dit(), "scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn),
              "blocks.0.self_attn.q.scale_weight": torch.ones(1)}
    assert scaled_fp8_format(scaled) and scaled_fp8_format(_dit(), {"_quantization_metadata": "{}"})
    assert not scaled_fp8_format({k: v.to(torch.float8_e4m3fn) for k, v in _dit().items()})  # plain fp8
    with pytest.raises(CheckpointError, match=r"wan_fp8_scaled\.safetensors is ComfyUI's scaled fp8 format .* "
                                              r"wan2\.1_i2v_720p_14B_bf16\.safetensors, and set weight_dtype to "
                                              r"fp8_e4m3fn"):
        plan_flashportrait_dit(_overlay(), scaled, wan_name="wan_fp8_scaled.safetensors")
    # A complete FlashPortrait file needs no base, so a scaled base is never read and never refused.
    assert plan_flashportrait_dit(_complete_dit(), None).complete
