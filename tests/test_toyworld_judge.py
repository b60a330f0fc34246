"""The toy world's concept judge: its data, lookalikes and manifest check (no judge is shipped
yet: docs/toyworld.md, The judge)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from attn_utils.toyworld import judge as J
from attn_utils.toyworld import judge_data as D
from attn_utils.toyworld.concepts import CONCEPTS, concept_scenes

MODELS = Path(__file__).resolve().parents[1] / "models" / "toyworld"


def test_training_data_never_includes_the_concept_photos_scenes():
    photos = [s for n in CONCEPTS for k in D.PHOTO_SEEDS for s in concept_scenes(n, k)]
    train = J.training_scenes()
    assert {s.seed for s in train}.isdisjoint({s.seed for s in photos})
    assert not {s.thing for s in train} & {s.thing for s in photos}  # no photo's pose either
    heldout = [s for n in D.NAMES for s in D.concept_set("heldout", n, J.HELDOUT)]
    assert {s.seed for s in train}.isdisjoint({s.seed for s in heldout})


@pytest.mark.parametrize("kind", D.KINDS)
def test_lookalikes_of_each_kind_are_generated_and_are_not_the_concept(kind):
    for name in D.NAMES:
        spec, j = CONCEPTS[name]["spec"], D.NAMES.index(name)
        scenes = D.lookalike_set("train", name, kind, 40)
        assert len(scenes) == 40
        assert all(D.labels(s)[j] == 0 for s in scenes)
        things = [s.thing for s in scenes]
        if kind == "same_body":
            assert all((t.category, t.colour) == (spec.category, spec.colour) for t in things)
            assert all(t.pattern != spec.pattern for t in things)
        elif kind == "same_pattern":
            assert all((t.pattern, t.accent) == (spec.pattern, spec.accent) for t in things)
            assert all((t.category, t.colour) != (spec.category, spec.colour) for t in things)
        elif kind == "other_concept":
            assert all(sum(D.labels(s)) == 1 for s in scenes)
        else:
            assert all(sum(D.labels(s)) == 0 for s in scenes)


def test_loading_a_judge_whose_files_do_not_match_the_manifest_is_refused(tmp_path):
    from attn_utils.config import ConfigError

    manifest = {"kind": "attndreambooth shipped models", "files": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    J.write(tmp_path / "judge", J.JudgeNet(len(D.NAMES)), {}, {})  # lists its files
    J.Judge.load(tmp_path / "judge")  # as written: accepted
    weights = tmp_path / "judge" / J.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="does not match"):
        J.Judge.load(tmp_path / "judge")


def test_judge_command_writes_the_judge_and_lists_it_in_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(
        J, "TRAIN", {"concept": 2, "same_body": 1, "same_pattern": 1, "ordinary": 2}
    )
    monkeypatch.setattr(J, "HELDOUT", 2)
    manifest = {"kind": "attndreambooth shipped models", "files": {"judge/old.bin": "0"}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    J.main(tmp_path / "judge", MODELS / "base", steps=2, threads=1)
    files = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert sorted(files) == [f"judge/{n}" for n in (J.CONFIG, J.WEIGHTS, J.REPORT)]
    report = json.loads((tmp_path / "judge" / J.REPORT).read_text())
    assert set(report["measured"]) == set(D.NAMES)
    assert np.isfinite(report["measured"]["dotted_cup"]["recognised"]["vae"])
    J.Judge.load(tmp_path / "judge")
