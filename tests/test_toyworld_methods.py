"""The toy world as a user meets it (issue 29 item 7): every method of the study from one
command with the study's budget, and prompt words the toy tokenizer does not know named once."""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, cli_error
from transformers import CLIPTokenizer

import evaluate
import train_attndreambooth
from attn_utils.evaluate import study_plan
from attn_utils.method.templates import TI_OBJECT_TEMPLATES
from attn_utils.method.vocabulary import unknown_words
from attn_utils.tiny import _make_tokenizer
from attn_utils.toyworld import method_run, study
from attn_utils.toyworld.__main__ import main as toyworld_main
from attn_utils.toyworld.study import METHODS, MODELS
from attn_utils.train.methods import config_from_args
from attn_utils.train.prompts import warn_unknown_words

TOY_TOKENIZER = MODELS / "base" / "tokenizer"


def test_each_methods_command_trains_exactly_as_the_study_does(tmp_path, capsys):
    """For every method and ablation, `toyworld train`'s argv is the argv evaluate.py study
    builds from `toyworld study`'s command line for that method (budget, seed, folders)."""
    out = tmp_path / "toy"
    study.write_concepts(out, ["dotted_cup"])
    for method in METHODS:
        ns = argparse.Namespace(methods=method, out=out, seed=3, images=400, images_per_prompt=1,
                                models=MODELS, prompts=study.PROMPTS)  # fmt: skip
        argv = study.study_argv(ns)
        plan = evaluate.study_plan_of(evaluate.build_study_parser().parse_args(argv[2:]))
        (concept,) = plan.concepts
        theirs = study_plan.train_argv(plan, concept, method)
        ours = method_run.train_argv(method, "dotted_cup", out, MODELS, 400, 3)
        assert ours == theirs, method
        cli = ["train", "--method", method, "--name", "dotted_cup", "--out", str(out),
               "--images", "400", "--seed", "3", "--dry_run"]  # fmt: skip
        with pytest.raises(SystemExit) as e:
            toyworld_main(cli)
        assert e.value.code == 0
        assert capsys.readouterr().out.strip() == shlex.join([sys.executable, *ours])


def test_a_baseline_trains_on_the_toy_model_from_its_one_command(tmp_path):
    """TI (5 optimiser steps with --images 1) trains on the shipped toy model without a
    refusal, and its run names the template words the toy tokenizer lacks in one warning."""
    out = tmp_path / "toy"
    cmd = [sys.executable, "-m", "attn_utils.toyworld", "train", "--method", "ti",
           "--name", "dotted_cup", "--out", str(out), "--images", "1"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = shlex.split(r.stdout.splitlines()[0])
    assert printed[1:] == method_run.train_argv("ti", "dotted_cup", out, MODELS, 1, 0)
    assert (out / "concepts" / "dotted_cup" / "run-ti" / "stage_1").is_dir()
    warnings = [ln for ln in r.stderr.splitlines() if "does not know" in ln]
    assert len(warnings) == 1, r.stderr[-3000:]
    assert "rendition" in warnings[0] and "cropped" in warnings[0]


def test_a_closed_vocabulary_names_each_word_it_lacks_once():
    toy = CLIPTokenizer.from_pretrained(str(TOY_TOKENIZER))
    texts = [*TI_OBJECT_TEMPLATES, "a rendition of the {} on the beach", "A Cropped photo"]
    words = unknown_words(toy, texts)
    assert words == ["rendering", "cropped", "clean", "dirty", "dark", "my", "cool", "close-up",
                     "bright", "good", "one", "rendition", "nice", "weird", "large"]  # fmt: skip
    assert (
        unknown_words(toy, ["a sketch of a small red cup next to a big blue ball at night"]) == []
    )


def test_a_real_style_tokenizer_does_not_warn_for_its_words(tmp_path):
    """The tiny model's byte-pair tokenizer splits 'wombat' into 'wom' + 'bat' by design: a
    word in pieces is not unknown. A real-size vocabulary never warns."""
    tiny = _make_tokenizer(tmp_path / "tok")
    ordinary = ["a photo of a wombat in the snow", "a watercolor painting of a hedgehog",
                "a rendering of a teddy bear wearing a hat", "a {} sloth on the beach"]  # fmt: skip
    assert unknown_words(tiny, ordinary) == []

    class RealSize:  # the tiny tokenizer's pieces, a real CLIP vocabulary's size
        def __len__(self) -> int:
            return 49408

        def tokenize(self, word: str) -> list[str]:
            return tiny.tokenize(word)

    assert unknown_words(tiny, ["a cropped photo"]) == ["cropped"]
    assert unknown_words(RealSize(), ["a cropped photo", *TI_OBJECT_TEMPLATES]) == []


def test_a_run_warns_once_listing_every_prompts_unknown_words(tmp_path, caplog):
    """CoRe's default context prompts, the validation prompt and the instance prompt are all
    checked; one warning lists each unknown word once."""
    argv = ["--pretrained_model_name_or_path", str(MODELS / "base"), "--instance_data_dir",
            str(tmp_path), "--category", "cup", "--output_dir", str(tmp_path / "run"),
            "--method", "core", "--validation_prompt", "a {} in the jungle at dusk"]  # fmt: skip
    cfg = config_from_args(train_attndreambooth.build_parser().parse_args(argv))
    toy = CLIPTokenizer.from_pretrained(str(TOY_TOKENIZER))
    with caplog.at_level(logging.WARNING, logger="attn_utils.train.prompts"):
        words = warn_unknown_words(cfg, toy)
    (record,) = caplog.records
    assert "jungle" in words and "dusk" in words and "close-up" in words  # core_universal.txt
    assert len(words) == len(set(words))
    assert record.getMessage().endswith(", ".join(words))


def test_every_flag_of_a_stage_the_method_lacks_is_refused_in_one_line(run_train, capsys):
    """`--method ti` with the study's validation flags of all three stages: one line names
    both flags it has no stage for and the flags it has, not one refusal at a time."""
    argv = ["--pretrained_model_name_or_path", str(MODELS / "base"), "--instance_data_dir", "d",
            "--output_dir", "o", "--category", "cup", "--method", "ti", "--ti_validation_steps",
            "0", "--attn_validation_steps", "0", "--unet_validation_steps", "0"]  # fmt: skip
    err, _ = cli_error(run_train, capsys, argv)
    assert err == (
        "error: --attn_validation_steps, --unet_validation_steps: --method ti has no stage 2 "
        "or 3 (its stages' flags: --ti_*)"
    )


def test_the_docs_table_gives_each_methods_budget_as_the_study_does():
    """docs/toyworld.md's row of each method: its steps are study.scaled_steps at 1000 images."""
    rows = {}
    for line in (ROOT / "docs" / "toyworld.md").read_text().splitlines():
        m = re.search(r"train --method (\w+) .*\| (.*) \|$", line)
        if m:
            rows[m[1]] = m[2]
    assert set(rows) == set(METHODS)
    for method, budget in rows.items():
        steps = re.search(r"stages? [\d /]+: ([\d /]+)", budget)[1].split(" / ")
        assert [int(s) for s in steps] == list(study.scaled_steps(method, 1000).values()), method
        assert ("--fast" in budget) == ("--fast" in study.method_flags(method, 1000)), method
