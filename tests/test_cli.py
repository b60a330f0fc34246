"""The command lines as a user meets them: plans, help, mistyped flags."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

import train_attndreambooth

BASE = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--output_dir", "o",
        "--category", "sloth", "--dry_run"]  # fmt: skip
# Plans printed by --dry_run before the library was split into layers (commit 685362a).
RECORDED = json.loads((ROOT / "tests" / "data" / "dry_run_plans.json").read_text())


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_dry_run_prints_the_recorded_plan(capsys, case):
    assert train_attndreambooth.main([*BASE, *RECORDED[case]["argv"]]) == 0
    assert json.loads(capsys.readouterr().out) == RECORDED[case]["plan"]
