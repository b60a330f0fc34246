"""evaluate.py study: one tiny study end to end, resume, aggregation, process split, plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, cli_error
from PIL import Image
from tiny_metric_models import build_tiny_clip, build_tiny_dino

import evaluate
import inference
import train_attndreambooth
from attn_utils.evaluate import plots
from attn_utils.evaluate.study import check_protocol, child_env, dist_info, shard
from attn_utils.evaluate.study_plan import make_variants, method_train_args, read_concepts
from attn_utils.evaluate.summary import summarize

ONE_STEP = "--ti_train_steps 1 --attn_train_steps 1 --unet_train_steps 1 "
ONE_STEP += "--ti_batch_size 1 --attn_batch_size 1 --unet_batch_size 1 --resolution 128"
FAST_RENDER = "--num_inference_steps 2 --resolution 64 --infer_batch_size 2"


class InProcess:
    """Runs our CLIs in this process (a subprocess each would cost seconds); counts calls."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, argv: list[str], env: dict) -> int:
        script = Path(argv[0]).name
        self.calls.append(script)
        main = {"train_attndreambooth.py": train_attndreambooth.main}.get(script, inference.main)
        return main(argv[1:])


def _never(*_a, **_k):
    raise AssertionError("a finished step was redone")


def _with_out(argv: list[str], out: Path) -> list[str]:
    """The study's argv with another --out."""
    i = argv.index("--out") + 1
    return [*argv[:i], str(out), *argv[i + 1 :]]


def _assert_picture(path: Path) -> None:
    """A real plot: a sizeable image, not blank (several colours, pixels that vary)."""
    im = Image.open(path).convert("RGB")
    assert min(im.size) >= 300, im.size
    px = np.asarray(im, dtype=np.float64)
    assert px.std() > 5 and len(np.unique(px.reshape(-1, 3), axis=0)) > 10


@pytest.fixture(scope="module")
def study(tiny_model, concept, tmp_path_factory):
    """One concept x 2 prompts x 2 images, rows stage_1 and stage_3; (argv, out, runner)."""
    root = tmp_path_factory.mktemp("study")
    models = root / "metric_models"
    clip, dino = build_tiny_clip(models / "clip"), build_tiny_dino(models / "dino")
    (root / "concepts.json").write_text(
        json.dumps([{"dir": str(concept), "category": "sloth", "name": "sloth"}])
    )
    (root / "prompts.txt").write_text("a {} on the beach\na watercolor painting of {}\n")
    out = root / "out"
    argv = ["study", "--concepts", root / "concepts.json", "--prompts", root / "prompts.txt"]
    argv += ["--out", out, "--pretrained_model_name_or_path", tiny_model]
    argv += ["--clip_model", clip, "--dino_model", dino, "--num_images_per_prompt", 2]
    argv += ["--train_args", ONE_STEP, "--infer_args", FAST_RENDER]
    argv = [str(a) for a in argv]
    runner = InProcess()
    assert evaluate.main(argv, runner=runner) == 0
    return argv, out, runner


def test_study_trains_renders_scores_and_aggregates(study):
    _, out, runner = study
    assert runner.calls == ["train_attndreambooth.py", "inference.py", "inference.py"]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["variant"] for r in summary["rows"]] == ["stage_1", "stage_3"]
    assert all(r["n_concepts"] == 1 and r["n_images"] == 4 for r in summary["rows"])
    for row in summary["rows"]:  # one concept: its own numbers, with std 0 over concepts
        v = row["variant"]
        one = json.loads((out / f"concepts/sloth/{v}/metrics.json").read_text())
        for m in ("clip_t", "clip_i", "dino"):
            assert row[m] == pytest.approx(one["overall"][m], abs=1e-12) and row[f"{m}_std"] == 0
            assert summary["per_concept"][v]["sloth"][m] == one["overall"][m]
            for cls, got in summary["per_class"][v].items():
                assert got[m] == pytest.approx(one["per_class"][cls][m], abs=1e-12)
            for p in one["per_prompt"]:
                assert summary["per_prompt"][v][p["template"]][m] == pytest.approx(p[m], abs=1e-12)
    for name in ("summary.md", "summary.csv", "report.md"):
        assert (out / name).is_file(), name
    _assert_picture(out / "identity_vs_text.png")
    _assert_picture(out / "per_prompt.png")
    report = (out / "report.md").read_text()
    assert "concepts/sloth/stage_3/overview.png" in report and "identity_vs_text.png" in report
    idx = json.loads((out / "concepts/sloth/stage_1/samples/index.json").read_text())
    assert idx["settings"]["stage"] == 1 and idx["settings"]["seed"] == 0  # TI-like: base U-Net
    for e in idx["prompts"].values():
        assert e["image_seeds"] == [0, 1]  # the same fixed seeds for every prompt and row


def test_resumed_study_skips_finished_work(study, monkeypatch):
    argv, out, _ = study
    before = (out / "concepts/sloth/stage_1/metrics.json").stat().st_mtime_ns
    # Everything done: no training, rendering or metric model is touched again.
    monkeypatch.setattr(evaluate, "_models_loader", lambda *a, **k: _never)
    assert evaluate.main(argv, runner=_never) == 0
    assert (out / "concepts/sloth/stage_1/metrics.json").stat().st_mtime_ns == before
    # Interrupted after stage_3's rendering: only its evaluation runs again.
    (out / "concepts/sloth/stage_3/metrics.json").unlink()
    (out / "summary.json").unlink()
    monkeypatch.undo()
    assert evaluate.main(argv, runner=_never) == 0
    assert (out / "concepts/sloth/stage_3/metrics.json").is_file()
    assert (out / "concepts/sloth/stage_1/metrics.json").stat().st_mtime_ns == before
    assert (out / "summary.json").is_file()


def test_launched_processes_split_and_rank_0_aggregates(study, monkeypatch):
    argv, out, _ = study
    (out / "summary.json").unlink()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # the one unit (sloth, attndreambooth) is rank 0's
    assert evaluate.main(argv, runner=_never) == 0
    assert not (out / "summary.json").exists()  # only rank 0 writes the aggregate
    monkeypatch.setenv("RANK", "0")
    assert evaluate.main(argv, runner=_never) == 0
    assert (out / "summary.json").is_file()


def test_processes_split_a_concepts_methods(study, monkeypatch):
    """Units are (concept, method): with one concept and two methods, rank 1 trains, renders
    and scores the second method, and nothing of the first."""
    argv, out, _ = study
    argv = [*_with_out(argv, out.parent / "split"), "--methods", "attndreambooth,ti"]
    plan = evaluate.study_plan_of(evaluate.build_study_parser().parse_args(argv[1:]))
    check_protocol(plan)  # as rank 0 does first (rank 1 waits for it)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    runner = InProcess()
    assert evaluate.main(argv, runner=runner) == 0
    assert runner.calls == ["train_attndreambooth.py", "inference.py"]
    sloth = out.parent / "split" / "concepts" / "sloth"
    assert (sloth / "ti" / "metrics.json").is_file() and (sloth / "train-ti.done.json").is_file()
    assert not (sloth / "stage_1").exists() and not (sloth / "train.done.json").exists()


def test_a_failed_process_stops_the_waiting_one(study, tmp_path):
    """Two launched processes; rank 0 refuses the protocol, rank 1 waits for it: both stop."""
    argv, _, _ = study
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"format": 1, "protocol": {"seed": 99}}))
    procs, t0 = [], time.monotonic()
    try:
        for rank in (0, 1):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
            cmd = [sys.executable, str(ROOT / "evaluate.py"), *_with_out(argv, out)]
            procs.append(subprocess.Popen(cmd, env={**env, "OMP_NUM_THREADS": "1"},
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))  # fmt: skip
        errs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()  # a no-op once it has exited
    seconds = time.monotonic() - t0
    assert [p.returncode for p in procs] == [2, 2], errs
    lines = [[ln for ln in e.splitlines() if ln.startswith("error:")] for e in errs]
    assert len(lines[0]) == 1 and lines[0][0].startswith("error: --out:"), errs[0]
    assert len(lines[1]) == 1 and "process 1/2 of the study failed (--out:" in lines[1][0]
    assert "process 2/2 stops too" in lines[1][0]
    marker = json.loads((out / "study.failed.json").read_text())
    assert marker["rank"] == 0 and marker["error"].startswith("--out:")
    assert seconds < 45, seconds


def test_a_wait_without_progress_ends(study, tmp_path, monkeypatch, capsys):
    """Rank 1 waits for a rank 0 that never writes study.json: one error after --wait_timeout."""
    argv, _, _ = study
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    argv = _with_out(argv, tmp_path / "out") + ["--wait_timeout", "0.3"]
    t0 = time.monotonic()
    line, _ = cli_error(lambda a: evaluate.main(a, runner=_never), capsys, argv)
    assert line.startswith("error: --wait_timeout: waited 0.3 s for rank 0 to write ")
    assert "study.json" in line and time.monotonic() - t0 < 10
    assert json.loads((tmp_path / "out/study.failed.json").read_text())["rank"] == 1


def test_an_earlier_launchs_failure_does_not_stop_a_relaunch(study):
    """A marker left by an earlier launch: rank 1 polls past it, rank 0 removes it."""
    argv, out, _ = study
    (out / "study.json").unlink()  # rank 1 waits for rank 0 while the old marker is there
    old = {"rank": 0, "world_size": 2, "error": "--out: an earlier launch", "attempt": None}
    (out / "study.failed.json").write_text(json.dumps({**old, "time": time.time() - 3600}))
    ns = evaluate.build_study_parser().parse_args(argv[1:])
    results = {}

    def launch(rank: int) -> None:
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"}
        try:
            results[rank] = evaluate.run_study_cli(ns, _never, env)
        except BaseException as e:  # reported by the assertion below
            results[rank] = e

    rank_1 = threading.Thread(target=launch, args=(1,))
    rank_1.start()
    time.sleep(1.2)  # rank 1 polls, and sees the old marker
    launch(0)
    rank_1.join(30)
    assert results == {0: 0, 1: 0}
    assert not (out / "study.failed.json").exists() and (out / "summary.json").is_file()


def test_changed_protocol_is_refused(study, capsys):
    argv, out, _ = study
    changed = [a if a != "2" else "3" for a in argv]  # --num_images_per_prompt 3
    line, _ = cli_error(lambda a: evaluate.main(a, runner=_never), capsys, changed)
    assert line.startswith("error: --out:") and "num_images_per_prompt" in line


# ---------------------------------------------------------------- pure parts


def _result(clip_t: float, dino: float, classes: dict[str, int]) -> dict:
    """A metrics.json-shaped result: one prompt per class count, values equal everywhere."""
    vals = {"clip_t": clip_t, "clip_i": 0.5, "dino": dino}
    std = {f"{k}_std": 0.0 for k in vals}
    per_prompt = [
        {"template": f"{c} {i} {{}}", "class": c, "n_images": 4, **vals, **std}
        for c, n in classes.items()
        for i in range(n)
    ]
    per_class = {
        c: {"n_images": 4 * n, "n_prompts": n, **vals, **std} for c, n in classes.items()
    }  # fmt: skip
    n = sum(classes.values())
    overall = {"n_images": 4 * n, "n_prompts": n, "n_real": 3, **vals, **std}
    return {"overall": overall, "per_class": per_class, "per_prompt": per_prompt}


def test_aggregation_counts_and_means():
    classes = {"background": 3, "property": 2}
    results = {
        "stage_1": {f"c{i}": _result(0.2 + 0.1 * i, 0.4, classes) for i in range(3)},
        "stage_3": {f"c{i}": _result(0.3, 0.6 + 0.1 * i, classes) for i in range(3)},
    }
    s = summarize(results, {"stage_1": "TI-like", "stage_3": "full"})
    r1, r3 = s["rows"]
    assert (r1["n_concepts"], r1["n_images"], r1["label"]) == (3, 60, "TI-like")
    assert r1["clip_t"] == pytest.approx(0.3) and r1["clip_t_std"] == pytest.approx(0.0816, 1e-3)
    assert r3["dino"] == pytest.approx(0.7) and r3["clip_t_std"] == pytest.approx(0.0)
    assert s["per_class"]["stage_1"]["background"]["n_prompts"] == 3
    assert s["per_class"]["stage_1"]["property"]["n_concepts"] == 3
    assert len(s["per_prompt"]["stage_3"]) == 5 and len(s["per_concept"]["stage_3"]) == 3


def test_concepts_split_over_processes():
    assert shard(5, 0, 2) == [0, 2, 4] and shard(5, 1, 2) == [1, 3]
    assert shard(3, 0, 1) == [0, 1, 2] and shard(1, 1, 2) == []
    parts = [shard(7, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(7))  # each concept exactly once
    assert dist_info({}) == (0, 1, 0)
    assert dist_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x"}
    env |= {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "4,5"}
    child = child_env(env, local_rank=1, world=2)
    assert child == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "5"}  # a lone process on its GPU
    assert child_env({"PATH": "/bin"}, 0, 1) == {"PATH": "/bin"}


def test_concepts_file_and_methods_errors(tmp_path, concept):
    from attn_utils.config import ConfigError

    f = tmp_path / "c.json"
    f.write_text(json.dumps([{"dir": str(concept), "category": "sloth"}]))
    assert read_concepts(f)[0].name == concept.name
    f.write_text(json.dumps([{"dir": "missing", "category": "x"}]))
    with pytest.raises(ConfigError, match="--concepts: .*is not a folder"):
        read_concepts(f)
    f.write_text(json.dumps([{"dir": str(concept), "category": "a"}] * 2))
    with pytest.raises(ConfigError, match="two concepts are named"):
        read_concepts(f)
    with pytest.raises(ConfigError, match="--methods: unknown method 'neti'"):
        make_variants(["attndreambooth", "neti"], [1, 3])
    rows = make_variants(["attndreambooth", "ti", "dreambooth", "ti_db", "no_stage3"], [1, 3])
    assert [(v.name, v.method, v.stage) for v in rows] == [
        ("stage_1", "attndreambooth", 1), ("stage_3", "attndreambooth", 3),
        ("ti", "ti", 1), ("dreambooth", "dreambooth", 3), ("ti_db", "ti_db", 3),
        ("no_stage3", "no_stage3", 2),  # an ablation renders its last stage
    ]  # fmt: skip
    assert rows[-1].label == "AttnDreamBooth without stage 3"
    from attn_utils.evaluate.study_plan import METHODS

    every = make_variants([m for m in METHODS if m != "attndreambooth"], [3])
    assert len(every) == len(METHODS) - 1 and all(v.stage in (1, 2, 3) for v in every)
    assert [v.name for v in make_variants(["attndreambooth"], [1, 2, 3])] == [
        "stage_1",
        "stage_2",
        "stage_3",
    ]


def test_plots_are_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    classes = {"background": 1}
    s = summarize({"stage_3": {"c": _result(0.3, 0.6, classes)}}, {"stage_3": "full"})
    assert set(plots.write_plots(s, tmp_path)) == {"identity_vs_text", "per_prompt"}
    _assert_picture(tmp_path / "identity_vs_text.png")
    _assert_picture(tmp_path / "per_prompt.png")
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    assert plots.write_plots(s, tmp_path / "none") == {}
    assert "plots skipped" in capsys.readouterr().out


def test_shared_train_args_keep_only_what_a_method_has():
    args = ONE_STEP.split() + ["--fast", "--attn_bs=2", "--seed", "3"]
    ti = method_train_args(args, "ti")
    assert "--attn_train_steps" not in ti and "--unet_batch_size" not in ti
    assert "--fast" not in ti and "--attn_bs=2" not in ti
    assert ti[:4] == ["--ti_train_steps", "1", "--ti_batch_size", "1"] and ti[-2:] == [
        "--seed",
        "3",
    ]
    db = method_train_args(args, "dreambooth")  # stage 3 only
    assert "--ti_train_steps" not in db and "--unet_train_steps" in db and "--fast" not in db
    assert method_train_args(args, "attndreambooth") == args
    assert "--fast" in method_train_args(args, "no_stage2")  # the paper's stage 3
    assert "--fast" not in method_train_args(args, "no_stage3")


def test_study_rows_for_the_baselines(tiny_model, concept, tmp_path):
    """TI, DreamBooth and an ablation trained by the same CLI, rendered and scored as rows."""
    clip, dino = build_tiny_clip(tmp_path / "clip"), build_tiny_dino(tmp_path / "dino")
    (tmp_path / "c.json").write_text(json.dumps([{"dir": str(concept), "category": "sloth"}]))
    (tmp_path / "p.txt").write_text("a {} on the beach\n")
    out = tmp_path / "out"
    db = "dreambooth=--num_class_images 2 --sample_batch_size 2 --class_inference_steps 1"
    argv = ["study", "--concepts", tmp_path / "c.json", "--prompts", tmp_path / "p.txt",
            "--out", out, "--pretrained_model_name_or_path", tiny_model, "--clip_model", clip,
            "--dino_model", dino, "--num_images_per_prompt", 1, "--methods",
            "ti,dreambooth,no_stage1",
            "--train_args", ONE_STEP + " --ti_ga 1", "--infer_args", FAST_RENDER,
            "--method_args", db]  # fmt: skip
    runner = InProcess()
    assert evaluate.main([str(a) for a in argv], runner=runner) == 0
    assert runner.calls == ["train_attndreambooth.py", "inference.py"] * 3  # method by method
    summary = json.loads((out / "summary.json").read_text())
    assert [r["variant"] for r in summary["rows"]] == ["ti", "dreambooth", "no_stage1"]
    assert (out / "concepts" / concept.name / "run-no_stage1" / "stage_3").is_dir()
    c = out / "concepts" / concept.name
    assert (c / "run-ti" / "stage_1").is_dir() and not (c / "run-ti" / "stage_3").exists()
    assert (c / "run-dreambooth" / "stage_3").is_dir() and (
        c / "train-dreambooth.done.json"
    ).is_file()
    assert len(list((c / "run-dreambooth" / "class_images").glob("*.png"))) == 2
    assert evaluate.main([str(a) for a in argv], runner=_never) == 0  # all done: nothing redone


def test_a_study_of_the_toy_base_model_scores_with_its_metric_models_by_itself(tmp_path):
    """--pretrained_model_name_or_path models/toyworld/base without metric-model flags: the
    toy CLIP, DINO and oracle shipped beside it; explicit flags still win."""
    toy = ROOT / "models" / "toyworld"
    (tmp_path / "concepts.json").write_text(json.dumps([{"dir": str(tmp_path), "category": "toy"}]))
    (tmp_path / "prompts.txt").write_text("a {} in the snow\n")
    argv = [
        "--concepts",
        str(tmp_path / "concepts.json"),
        "--prompts",
        str(tmp_path / "prompts.txt"),
    ]
    argv += ["--out", str(tmp_path / "out"), "--pretrained_model_name_or_path", str(toy / "base")]
    got = evaluate.study_plan_of(evaluate.build_study_parser().parse_args(argv)).metric_settings
    assert [Path(got[k]) for k in ("clip_model", "dino_model", "oracle_model")] == [
        toy / "clip", toy / "dino", toy / "oracle"
    ]  # fmt: skip
    argv += ["--clip_model", "someone/clip"]
    got = evaluate.study_plan_of(evaluate.build_study_parser().parse_args(argv)).metric_settings
    assert got["clip_model"] == "someone/clip" and Path(got["dino_model"]) == toy / "dino"
