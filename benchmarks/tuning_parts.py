"""The trained ALP testbed's tuning split by budget: two processes can tune disjoint budgets on two cores, and
their part files merge into the one ``tuning.json`` the report reads.

A part is the ``tune`` dict for some budgets: per-budget entries under ``budgets``, ``alp``, ``alp_top`` and
``dial`` (keyed by the budget as a string), plus whole-run entries (``mag_ratios``, which every part computes
identically from the full runs, ``converged_check_db`` from the part that ran it, ``seconds``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

PER_BUDGET = ("budgets", "alp", "alp_top", "dial")


def part_name(budgets: Sequence[int]) -> str:
    """File name of the part holding ``budgets``: ``tuning_part_5_10.json``."""
    return "tuning_part_" + "_".join(str(b) for b in sorted(budgets)) + ".json"


def parse_budgets(text: str, allowed: Sequence[int]) -> tuple[int, ...]:
    """``"5,10"`` -> (5, 10); every budget must be one the evaluation runs."""
    budgets = tuple(int(part) for part in text.split(",") if part.strip())
    unknown = sorted(set(budgets) - set(allowed))
    if not budgets or unknown:
        raise ValueError(f"budgets must be a comma-separated subset of {tuple(allowed)}, got {text!r}")
    return budgets


def merge_parts(parts: Iterable[dict], budgets: Sequence[int]) -> dict:
    """One tuning dict from parts covering ``budgets`` exactly once each.

    Raises ValueError when a budget is missing or tuned twice, or when the parts disagree on the magnitude
    ratios (they would then not come from the same model and clips).
    """
    merged: dict = {key: {} for key in PER_BUDGET}
    merged["seconds"] = 0.0
    for part in parts:
        for budget in part["budgets"]:
            if budget in merged["budgets"]:
                raise ValueError(f"budget {budget} is tuned in two parts")
            for key in PER_BUDGET:
                merged[key][budget] = part[key][budget]
        if "mag_ratios" in merged and merged["mag_ratios"] != part["mag_ratios"]:
            raise ValueError("the parts' magnitude ratios differ: not the same model or tuning clips")
        merged["mag_ratios"] = part["mag_ratios"]
        if "converged_check_db" in part:
            merged["converged_check_db"] = part["converged_check_db"]
        merged["seconds"] += part.get("seconds", 0.0)
    missing = sorted(set(str(b) for b in budgets) - set(merged["budgets"]), key=int)
    if missing:
        raise ValueError(f"no part tunes budgets {missing}")
    return merged


def merge_part_files(folder: Path, budgets: Sequence[int]) -> dict | None:
    """The merged tuning of the part files in ``folder``, or None when they do not cover ``budgets`` yet."""
    parts = [json.loads(path.read_text()) for path in sorted(folder.glob("tuning_part_*.json"))]
    covered = {b for part in parts for b in part["budgets"]}
    if not parts or not {str(b) for b in budgets} <= covered:
        return None
    return merge_parts(parts, budgets)
