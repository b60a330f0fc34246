"""Issue 5, items 2-3: embedding and checkpoint files. Nothing is unpickled; a broken,
mismatched or malicious file stops the run with one line naming it."""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli_error, train_argv
from safetensors.torch import save_file

from attn_utils.config import ConfigError
from attn_utils.runfiles import load_embeddings
from attn_utils.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint


@pytest.fixture(scope="module")
def stage1_run(tiny_model, concept, tmp_path_factory) -> Path:
    import train_attndreambooth

    out = tmp_path_factory.mktemp("s1") / "run"
    assert train_attndreambooth.main(train_argv(tiny_model, concept, out, "--stages", "1")) == 0
    return out


class Payload:
    """Unpickling this calls fn(*args): here, creating a marker file or folder."""

    def __init__(self, fn, *args):
        self.call = (fn, args)

    def __reduce__(self):
        return self.call


def _evil_pickle(kind: str, marker: Path) -> bytes:
    legacy = kind == "legacy"
    obj = {
        "new_concept_v0": Payload(os.makedirs, str(marker))
        if legacy
        else Payload(open, str(marker), "w")
    }
    if kind in ("raw", "proto0"):
        return pickle.dumps(obj, protocol=4 if kind == "raw" else 0)
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=kind == "zip")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["raw", "zip", "legacy", "proto0"])
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_malicious_embedding_pickle_is_refused(tmp_path, kind, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"learned_embeds{suffix}"
    path.write_bytes(_evil_pickle(kind, marker))
    with pytest.raises(ConfigError) as e:
        load_embeddings(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "weights_only" not in msg
    assert ("refused" in msg) if kind != "proto0" else ("not a readable" in msg)
    assert not marker.exists()


def test_embedding_files_load_or_name_the_file(tmp_path):
    v = torch.randn(32)  # honest legacy .bin (zip and old format) and A1111 files still load
    torch.save({"new_concept_v0": v}, tmp_path / "zip.bin")
    torch.save({"new_concept_v0": v}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    torch.save({"string_to_param": {"*": v[None]}, "name": "x", "step": 3}, tmp_path / "a.pt")
    for name in ("zip.bin", "old.bin"):
        assert torch.equal(load_embeddings(tmp_path / name, dim=32)["new_concept_v0"], v)
    assert torch.equal(load_embeddings(tmp_path / "a.pt")["*"], v)
    bad = {"small": torch.zeros(7), "nan": torch.full((32,), float("nan"))}
    for name, value in bad.items():
        save_file({"new_concept_v0": value}, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(ConfigError, match=r"small\.safetensors: entry 'new_concept_v0' has shape"):
        load_embeddings(tmp_path / "small.safetensors", dim=32)
    with pytest.raises(ConfigError, match=r"nan\.safetensors: .* NaN"):
        load_embeddings(tmp_path / "nan.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not tensors")
    with pytest.raises(ConfigError, match="junk.safetensors: not a readable embedding file"):
        load_embeddings(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("bad", ["wrong_dim", "nan", "pickle"])
def test_bad_stage1_file_stops_stages_2_3_naming_it(
    run_train, capsys, tmp_path, tiny_model, concept, stage1_run, bad
):
    out = tmp_path / "run"
    shutil.copytree(stage1_run, out)
    f = out / "stage_1" / "learned_embeds.safetensors"
    marker = tmp_path / "pwned"
    if bad == "pickle":
        f.write_bytes(_evil_pickle("zip", marker))
    else:
        value = torch.zeros(7) if bad == "wrong_dim" else torch.full((32,), float("inf"))
        save_file({"new_concept_v0": value}, str(f))
    argv = train_argv(tiny_model, concept, out, "--stages", "2,3")
    line, _ = cli_error(run_train, capsys, argv)
    assert str(f) in line, line
    assert not marker.exists() and not (out / "stage_2").exists()


def _checkpoint(run_dir: Path) -> Path:
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(4)
    opt.step()
    return save_checkpoint(run_dir, 1, 2, {"learned_embeds": p}, opt, {"fingerprint": "x"}, 2)


def test_malicious_checkpoint_files_are_refused(run_train, capsys, tmp_path, tiny_model, concept):
    marker = tmp_path / "pwned"
    for target in ("trainable.safetensors", "optimizer.safetensors"):
        ck = _checkpoint(tmp_path / target)
        assert load_checkpoint(ck)[0]["step"] == 2
        (ck / target).write_bytes(_evil_pickle("zip", marker))
        with pytest.raises(ConfigError, match="--resume_from_checkpoint: .* not a readable"):
            load_checkpoint(ck)
    foreign = tmp_path / "accelerate_ckpt"
    foreign.mkdir()
    for name in ("optimizer.bin", "pytorch_model.bin", "random_states_0.pkl"):
        (foreign / name).write_bytes(_evil_pickle("zip", marker))
    with pytest.raises(ConfigError, match="never loaded"):
        resolve_resume(tmp_path, str(foreign))
    out = tmp_path / "out"
    ck = _checkpoint(out)
    (ck / "trainable.safetensors").write_bytes(_evil_pickle("raw", marker))
    argv = train_argv(tiny_model, concept, out, "--stages", "1")
    for resume in (str(foreign), "latest"):
        line, _ = cli_error(run_train, capsys, [*argv, "--resume_from_checkpoint", resume])
        assert line.startswith("error: --resume_from_checkpoint")
    assert not marker.exists()
