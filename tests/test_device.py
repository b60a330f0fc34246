"""Device placement: no tensor made by project code lands on the wrong device.

The CPU suite cannot see a CUDA device bug directly, so tests/device_emulation.py sends every
device-less tensor factory called from project files to `meta`; mixing such a tensor with a
model tensor raises, as CUDA does, and the mode lists every redirected call.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import ROOT, train_argv
from device_emulation import ForeignDefaultDevice
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import inference
import train_attndreambooth
from attn_utils.method import tokens
from attn_utils.train import trainer as trainer_module
from attn_utils.train.background import HostSnapshot
from attn_utils.train.trainer import Trainer
from bench.modes import StageRun, Variant, place
from bench.sd21_configs import build_models


def _in_project(code: str, name: str = "attn_utils/method/tokens.py", **env):
    """Run `code` as if it stood in a project file; return its `out`."""
    scope = {"torch": torch, **env}
    exec(compile(code, str(ROOT / name), "exec"), scope)
    return scope["out"]


def test_the_emulation_moves_only_project_calls_without_a_device():
    with ForeignDefaultDevice() as mode:
        assert _in_project("out = torch.tensor([1, 2])").device.type == "meta"
        assert _in_project("out = torch.zeros(2, device='cpu')").device.type == "cpu"
        assert _in_project("out = torch.arange(3)", "inference.py").device.type == "meta"
        assert torch.tensor([1]).device.type == "cpu"  # this test file is not project code
    assert len(mode.redirected) == 2 and "tokens.py" in mode.redirected[0]


def test_the_emulation_sees_generators_and_numpy_arrays_without_a_device():
    import numpy as np

    a = np.zeros(2, np.float32)
    with ForeignDefaultDevice() as mode:
        assert isinstance(_in_project("out = torch.Generator()"), torch.Generator)
        _in_project("out = torch.Generator('cpu')")  # deliberately on the CPU: said so
        _in_project("out = torch.Generator(device=torch.device('cpu'))")
        assert _in_project("out = torch.from_numpy(a)", a=a).device.type == "meta"
        host = "def augment_with_crop():\n    return torch.from_numpy(a)\nout = augment_with_crop()"
        assert _in_project(host, "attn_utils/train/data.py", a=a).device.type == "cpu"  # HOST_SIDE
        assert torch.from_numpy(a).device.type == "cpu" and torch.Generator() is not None
    assert [r.rsplit(" ", 1)[1] for r in mode.redirected] == ["Generator", "from_numpy"]
    assert torch.Generator is not type(mode) and isinstance(torch.Generator(), torch.Generator)


def test_the_bug_of_ef40d09_is_caught(monkeypatch, tiny_model, concept, tmp_path):
    """PlaceholderEmbedding made its token_ids buffer on the CPU after the text encoder moved
    to the GPU; the same line, run as project code, fails under the emulation."""
    old_init = _in_project(
        "def out(self, base, token_ids):\n"
        "    torch.nn.Module.__init__(self)\n"
        "    self.base = base\n"
        "    self.register_buffer('token_ids', torch.tensor(token_ids), persistent=False)\n"
        "    self.learned = torch.nn.Parameter(base.weight.detach()[token_ids].clone().float())\n"
    )
    monkeypatch.setattr(tokens.PlaceholderEmbedding, "__init__", old_init)
    argv = train_argv(tiny_model, concept, tmp_path / "run", "--stages", "1")
    with ForeignDefaultDevice(), pytest.raises(RuntimeError, match="device"):
        train_attndreambooth.main(argv)


class Crash(Exception):
    pass


@pytest.mark.parametrize(
    "extra",
    [
        [
            "--ti_checkpointing_steps",
            "2",
            "--unet_checkpointing_steps",
            "2",
            "--dataloader_num_workers",
            "1",
        ],
        ["--cache_latents", "--offload_text_encoder", "--max_grad_norm", "1.0", "--no-fused_adam"],
        ["--method", "core", "--core_norm_hold", "2", "3"],
        ["--unet_lora_rank", "4", "--attn_lora_rank", "4", "--unet_lora_dropout", "0.1"],
        [
            "--with_prior_preservation",
            "--num_class_images",
            "2",
            "--sample_batch_size",
            "2",
            "--class_inference_steps",
            "2",
        ],
    ],
    ids=["augment-resume", "pool", "core", "lora", "prior"],
)
def test_training_and_inference_make_every_tensor_on_its_device(
    monkeypatch, capsys, tiny_model, concept, tmp_path, extra
):
    run = tmp_path / "run"
    argv = train_argv(tiny_model, concept, run, "--validation_prompt", "a {} on a hill",
                      "--validation_inference_steps", "2", *extra)  # fmt: skip
    if "core" in extra:  # CoRe has no stage 2: its flags and their values go
        drop = {i + d for i, a in enumerate(argv) if a.startswith("--attn_") for d in (0, 1)}
        argv = [a for i, a in enumerate(argv) if i not in drop]
    resumes = "--unet_checkpointing_steps" in extra
    real_save = Trainer._save_stage

    def crash_before_stage_3_is_saved(self, k, *args):
        if k == 3 and resumes:
            raise Crash  # leaves checkpoint-s3-000002 to resume from
        return real_save(self, k, *args)

    # checkpoints through the reused host buffers that CUDA tensors take (pinned there)
    monkeypatch.setattr(trainer_module, "HostSnapshot", partial(HostSnapshot, reuse_cpu=True))
    with ForeignDefaultDevice() as mode:
        with monkeypatch.context() as m:
            m.setattr(Trainer, "_save_stage", crash_before_stage_3_is_saved)
            if resumes:
                with pytest.raises(Crash):
                    train_attndreambooth.main(argv)
            else:
                assert train_attndreambooth.main(argv) == 0
        if resumes:  # a checkpoint's tensors and optimiser state loaded back onto the device
            capsys.readouterr()
            assert train_attndreambooth.main([*argv, "--resume_from_checkpoint", "latest"]) == 0
            assert "stage 3: resumed from" in capsys.readouterr().out
        rc = inference.main([
            "--run_dir", str(run), "--prompt", "a {} on a hill", "--save_dir", str(tmp_path / "o"),
            "--num_images_per_prompt", "3", "--infer_batch_size", "2", "--num_inference_steps",
            "2", "--resolution", "64", "--save_attention_maps",
            "--export_pipeline", str(tmp_path / "export"),
        ])  # fmt: skip
        assert rc == 0
    assert (run / "stage_3" / "stage_info.json").is_file()
    assert mode.redirected == []  # every factory in project code named its device


@pytest.mark.parametrize("mode_name", ["ours", "original"])
def test_benchmark_steps_make_every_tensor_on_its_device(mode_name):
    torch.manual_seed(0)
    m = build_models("small")
    place(m, Variant(), torch.device("cpu"))
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with ForeignDefaultDevice() as mode:
        for stage in (1, 2, 3):
            with StageRun(m, stage, mode_name, Variant(), pixels) as run:
                run.step(0)
    assert mode.redirected == []


class _SyncOps(TorchDispatchMode):
    """Counts the aten ops that make the host wait for a CUDA device (.item(), bool(t), ...)."""

    SYNCS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += str(func).startswith(self.SYNCS)
        return func(*args, **(kwargs or {}))


# The tensor methods that copy to the host. A CPU tensor's copy never reaches the dispatcher,
# so they are seen at the Python level. `.to(device)` is left out: under the emulation the
# training device is the CPU too, and there it cannot be told from a real host copy.
TO_HOST = (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.item)


class HostReads(TorchFunctionMode):
    """Counts what would make the host wait for a CUDA device: the methods of TO_HOST plus
    the aten-level syncs (bool(t), torch.equal, nonzero, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.methods = 0
        self._ops = _SyncOps()

    @property
    def count(self) -> int:
        return self.methods + self._ops.count

    def __enter__(self):
        self._ops.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._ops.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.methods += func in TO_HOST
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("call", ["t.tolist()", "t.numpy()", "t.cpu()", "t.item()", "bool(t)"])
def test_host_reads_counts_every_way_to_the_host(call):
    t = torch.ones(())
    with HostReads() as mode:
        eval(call)
    with HostReads() as idle:
        t + 1
    assert mode.count >= 1 and idle.count == 0


def test_training_steps_do_not_wait_for_the_device(tiny_model, concept, tmp_path):
    """More steps, same number of host reads: none per step between logging intervals.

    Without the fused optimiser (which skips a non-finite step from a device flag) the
    finiteness checks read the device every step: the count then grows, as it must.
    """
    reads = {}
    for opt in ("--fused_adam", "--no-fused_adam"):
        for n in ("2", "5"):
            steps = [x for k in ("ti", "attn", "unet") for x in (f"--{k}_train_steps", n)]
            out = tmp_path / f"{opt}{n}"
            argv = train_argv(tiny_model, concept, out, "--logging_steps", "100", opt, *steps)
            with HostReads() as mode:
                assert train_attndreambooth.main(argv) == 0
            reads[opt, n] = mode.count
    assert reads["--fused_adam", "2"] == reads["--fused_adam", "5"] > 0
    assert reads["--no-fused_adam", "5"] - reads["--no-fused_adam", "2"] >= 3 * 3  # 3 stages
