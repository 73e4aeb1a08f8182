"""The FlashPortrait Model Loader and Portrait Encoder Loader in-process, on tiny format-faithful files: which file
is read for which weight, what the report says, and that the model owns its weights (no second copy, no file kept
mapped)."""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from flashportrait_core.weights.checkpoints import load_state_dict, wan_i2v_keys
from pack import import_pack
from tiny_nodes import tiny_folders, tiny_model  # noqa: F401 (fixtures)

pack = import_pack()
import folder_paths  # noqa: E402
from flashportrait_pack.flashportrait_core.weights.checkpoints import CheckpointError  # noqa: E402

loaders = pack.nodes.loaders
TINY_WAN, TINY_OVERLAY = "wan2.1_i2v_tiny.safetensors", "transformer_tiny.pt"


@pytest.fixture(scope="module")
def extra_files(tiny_folders, tmp_path_factory):
    """Variants of the tiny files in model folders of their own: a complete FlashPortrait DiT, a damaged Wan file,
    a plain fp8 and a scaled fp8 base, a portrait encoder saved with other keys beside its own."""
    root = tmp_path_factory.mktemp("models")
    for folder in ("diffusion_models", "flashportrait"):
        (root / folder).mkdir()
        folder_paths.add_model_folder_path(folder, str(root / folder))
    # Copies, so that no tensor of this fixture keeps a tiny file memory-mapped.
    base = {k: v.clone() for k, v in load_state_dict(tiny_folders / "diffusion_models" / TINY_WAN).items()}
    overlay = {k: v.clone() for k, v in load_state_dict(tiny_folders / "flashportrait" / TINY_OVERLAY).items()}
    torch.save({"state_dict": {f"model.diffusion_model.{k}": v for k, v in {**base, **overlay}.items()}},
               root / "flashportrait" / "zz_complete_tiny.pt")
    whole = (tiny_folders / "diffusion_models" / TINY_WAN).read_bytes()
    (root / "diffusion_models" / "zz_damaged_wan.safetensors").write_bytes(whole[: len(whole) // 2])
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in base.items()},
              str(root / "diffusion_models" / "zz_wan_fp8_e4m3fn.safetensors"))
    scaled = {k: v.to(torch.float8_e4m3fn) for k, v in base.items()}
    scaled.update({k.replace(".weight", ".scale_weight"): torch.ones(1) for k in base if k.endswith("q.weight")})
    scaled["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(scaled, str(root / "diffusion_models" / "zz_wan_fp8_scaled.safetensors"))
    encoder = load_state_dict(tiny_folders / "flashportrait" / "portrait_encoder_tiny.safetensors")
    torch.save({**encoder, "optimizer.step": torch.tensor(3), "ip_adapter.0.weight": torch.zeros(2)},
               root / "flashportrait" / "zz_portrait_encoder_with_extras.pt")
    return {"base": base, "overlay": overlay}


def _load(wan_model: str, weights: str, weight_dtype: str = "default"):
    output = loaders.FlashPortraitModelLoader.execute(wan_model, weights, weight_dtype)
    return output.result[0], "".join(output.ui["text"])


def test_wan_key_list_is_comfyuis_wan_model(tiny_model):
    # The list that decides "complete DiT" names exactly the weights of ComfyUI's Wan 2.1 I2V model.
    comfy_keys = {k for k in tiny_model.model.diffusion_model.state_dict() if ".emo_" not in k}
    assert set(wan_i2v_keys(2)) == comfy_keys


def test_overlay_report_says_which_file_gave_what(tiny_folders):
    _, report = _load(TINY_WAN, TINY_OVERLAY)
    lines = report.splitlines()
    assert lines[0] == (f"{TINY_OVERLAY} laid over {TINY_WAN}: 50 of 87 weights from {TINY_OVERLAY}, the other 37 "
                        f"from {TINY_WAN}; emotion attention in 2 blocks")
    assert lines[1].startswith("model weights float32 (the Wan base stores float32)")
    assert lines[2] == (f"read lazily: {TINY_OVERLAY}: torch zip, memory-mapped, pages released once copied; "
                        f"{TINY_WAN}: safetensors, memory-mapped, pages released once copied")


def test_complete_file_loads_without_reading_the_base(tiny_model, extra_files):
    expected = tiny_model.model.state_dict()
    for wan_model in ("none", "zz_damaged_wan.safetensors"):  # the damaged file would fail if it were read
        model, report = _load(wan_model, "zz_complete_tiny.pt")
        assert report.startswith("zz_complete_tiny.pt holds a complete Wan 2.1 I2V DiT (87 weights) and emotion "
                                 "attention in 2 blocks; no Wan base file is read")
        assert ("zz_damaged_wan.safetensors in wan_model was not read" in report) == (wan_model != "none")
        loaded = model.model.state_dict()
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    with pytest.raises(CheckpointError, match=f"{TINY_OVERLAY} holds only part of the Wan DiT .* select the Wan 2.1 "
                                              f"I2V 14B model in wan_model"):
        _load("none", TINY_OVERLAY)


def test_plain_fp8_base_loads_and_scaled_fp8_is_refused(extra_files):
    model, report = _load("zz_wan_fp8_e4m3fn.safetensors", TINY_OVERLAY)
    assert "(the Wan base stores float8_e4m3fn)" in report
    dit = model.model.diffusion_model
    fp8 = extra_files["base"]["blocks.0.ffn.0.weight"].to(torch.float8_e4m3fn)
    assert torch.equal(dit.blocks[0].ffn[0].weight.float(), fp8.float())  # the base's values, as stored
    q = dit.blocks[0].self_attn.q.weight  # from the FlashPortrait file, in the model's storage dtype
    assert torch.equal(q, extra_files["overlay"]["blocks.0.self_attn.q.weight"].to(q.dtype))
    with pytest.raises(CheckpointError, match="zz_wan_fp8_scaled.safetensors is ComfyUI's scaled fp8 format"):
        _load("zz_wan_fp8_scaled.safetensors", TINY_OVERLAY)


def _mapped_files() -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split(maxsplit=5)) == 6}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's mappings from /proc")
def test_the_model_owns_its_weights_and_no_file_stays_mapped(tiny_folders):
    model, _ = _load(TINY_WAN, TINY_OVERLAY)
    files = {str((tiny_folders / folder / name).resolve()) for folder, name in
             (("diffusion_models", TINY_WAN), ("flashportrait", TINY_OVERLAY))}
    assert not files & _mapped_files()  # no weight is a view of a file: each exists once, in the model
    tensors = list(model.model.state_dict().values())
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)  # no two weights share memory


def test_portrait_encoder_file_with_other_keys_loads_and_names_them(extra_files):
    output = loaders.FlashPortraitPortraitEncoderLoader.execute("zz_portrait_encoder_with_extras.pt")
    report = "".join(output.ui["text"])
    assert report == ("zz_portrait_encoder_with_extras.pt: portrait encoder, 24 tokens of 64 per frame; keys outside "
                      "proj_model./mouth_proj_model./emo_proj_model.: 2 ignored (not part of the model): "
                      "['ip_adapter.0.weight', 'optimizer.step']")
    reference = loaders.FlashPortraitPortraitEncoderLoader.execute("portrait_encoder_tiny.safetensors").result[0]
    features = torch.randn(2, 554, generator=torch.Generator().manual_seed(0))
    assert torch.equal(output.result[0](features), reference(features))
