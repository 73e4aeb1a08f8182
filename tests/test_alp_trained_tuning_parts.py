"""The trained ALP testbed's tuning in parts (budgets tuned by separate processes) and their merge."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from tuning_parts import merge_part_files, merge_parts, parse_budgets, part_name  # noqa: E402

BUDGETS = (5, 6, 8, 10)
RATIOS = [1.0, 0.98, 0.97]


def part(budgets, check=None) -> dict:
    out = {key: {str(b): {"budget": b, "key": key} for b in budgets} for key in ("budgets", "alp", "alp_top", "dial")}
    out.update(mag_ratios=list(RATIOS), seconds=10.0 * len(budgets))
    if check is not None:
        out["converged_check_db"] = check
    return out


def test_part_name_sorts_the_budgets():
    assert part_name((10, 5)) == "tuning_part_5_10.json"


def test_parse_budgets_accepts_a_subset_and_refuses_others():
    assert parse_budgets("5,10", BUDGETS) == (5, 10)
    with pytest.raises(ValueError, match="subset of"):
        parse_budgets("5,7", BUDGETS)
    with pytest.raises(ValueError, match="subset of"):
        parse_budgets("", BUDGETS)


def test_merge_takes_each_budget_from_its_part():
    merged = merge_parts([part((5, 10), check=[41.0, 42.5]), part((6, 8))], BUDGETS)
    assert sorted(merged["alp"], key=int) == ["5", "6", "8", "10"]
    assert merged["dial"]["8"] == {"budget": 8, "key": "dial"}
    assert merged["budgets"]["10"] == {"budget": 10, "key": "budgets"}
    assert merged["converged_check_db"] == [41.0, 42.5]
    assert merged["mag_ratios"] == RATIOS
    assert merged["seconds"] == 40.0


def test_merge_refuses_a_missing_or_repeated_budget():
    with pytest.raises(ValueError, match=r"budgets \['6', '8'\]"):
        merge_parts([part((5, 10))], BUDGETS)
    with pytest.raises(ValueError, match="budget 5 is tuned in two parts"):
        merge_parts([part((5, 10)), part((5, 6, 8))], BUDGETS)


def test_merge_refuses_parts_of_another_model():
    other = part((6, 8))
    other["mag_ratios"] = [1.0, 0.9, 0.97]
    with pytest.raises(ValueError, match="magnitude ratios differ"):
        merge_parts([part((5, 10)), other], BUDGETS)


def test_merge_part_files_waits_for_every_budget(tmp_path):
    (tmp_path / part_name((5, 10))).write_text(json.dumps(part((5, 10))))
    assert merge_part_files(tmp_path, BUDGETS) is None
    (tmp_path / part_name((6, 8))).write_text(json.dumps(part((6, 8))))
    assert sorted(merge_part_files(tmp_path, BUDGETS)["alp"], key=int) == ["5", "6", "8", "10"]
