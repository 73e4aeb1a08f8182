"""Convert the published 4-step distillation LoRA for ComfyUI's LoRA loaders.

ComfyUI (0.3.75) skips the LoRA's modulation diffs (``blocks.<i>.diff_m``, logged as "lora key not loaded")
and would scale by alpha / rank if alpha keys were present; the published merge applies both unscaled. The
converted file loads through LoraLoaderModelOnly (strength 1.0) onto the FlashPortrait Model Loader's model
exactly as published. Everything else is copied unchanged.

    python scripts/convert_fast_lora.py fast_lora_rank64.safetensors ComfyUI/models/loras/fast_lora_rank64_comfy.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from flashportrait_core.weights.lora_keys import convert_step_distill_lora, lora_key_summary  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="published fast_lora_rank64.safetensors")
    parser.add_argument("target", type=Path, help="where to write the converted LoRA (a ComfyUI loras folder)")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        parser.error(f"{args.source} does not exist")
    if args.source.resolve() == args.target.resolve():
        parser.error("target must differ from source")
    state_dict = load_file(str(args.source))
    converted = convert_step_distill_lora(state_dict)
    args.target.parent.mkdir(parents=True, exist_ok=True)
    partial = args.target.with_name(args.target.name + ".partial")
    save_file(converted, str(partial))
    partial.replace(args.target)  # no half-written LoRA under the final name
    print(f"{args.source.name}: {lora_key_summary(state_dict)}")
    print(f"wrote {args.target} ({len(converted)} tensors; modulation diffs renamed, alpha keys dropped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
