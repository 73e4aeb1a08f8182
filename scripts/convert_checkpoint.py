"""Convert published .pt/.pth checkpoints to safetensors (read safely, verified, source hash in metadata).

    python scripts/convert_checkpoint.py models/flashportrait/transformer.pt [more files ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # imported by tests: ComfyUI's `nodes` stays first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashportrait_core.weights.checkpoints import CheckpointError, convert_to_safetensors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--out-dir", type=Path, help="write next to each source when omitted")
    args = parser.parse_args(argv)
    failed = 0
    for source in args.checkpoints:
        target = (args.out_dir / source.with_suffix(".safetensors").name) if args.out_dir else None
        try:
            print(f"{source} -> {convert_to_safetensors(source, target)}")
        except CheckpointError as error:
            print(f"{source}: {error}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
