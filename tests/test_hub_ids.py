"""Hub ids: removed, missing and gated ones are one clear line; a cached one records its commit;
an SDXL under an id without "xl" is told by its files (fetched when not cached), not its name.

The Hub client's HTTP session is replaced by a fake that answers as the Hub does (404
RepoNotFound, 403 GatedRepo), so huggingface_hub, transformers and diffusers run their real
code paths with no network.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import httpx2
import pytest
from conftest import cli_error, train_argv
from huggingface_hub import constants, set_client_factory
from huggingface_hub.utils import _http

import inference
import train_attndreambooth
from attn_utils import models
from attn_utils.models import (
    REMOVED_HUB_IDS,
    FilesUnreadable,
    base_facts,
    base_model_source,
    load_base_model,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


class FakeHub:
    """Serves the folders in `served` ({repo id: folder}, at COMMIT) as the Hub's resolve and
    model-info endpoints do; answers anything else with the Hub's error for `code`; remembers
    the URLs asked."""

    def __init__(self) -> None:
        self.code, self.urls, self.served = "RepoNotFound", [], {}

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.urls.append(str(request.url))
        path = request.url.path.lstrip("/")
        for repo, folder in self.served.items():
            if path.startswith(f"{repo}/resolve/"):  # <repo>/resolve/<revision>/<file>
                return _file_response(request, folder / path.split("/", 4)[-1])
            if path.startswith(f"api/models/{repo}"):
                if "/tree/" in path:  # listings of optional folders: empty
                    return httpx2.Response(200, json=[], request=request)
                files = [str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()]
                info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
                return httpx2.Response(200, json=info, request=request)
        status = 403 if self.code == "GatedRepo" else 404
        return httpx2.Response(status, headers={"X-Error-Code": self.code}, request=request)

    def asked_about(self, repo_id: str) -> bool:
        return any(repo_id in url for url in self.urls)


def _file_response(request: httpx2.Request, file: Path) -> httpx2.Response:
    """The Hub's answer for one file of a repository at COMMIT (HEAD: the headers only)."""
    if not file.is_file():
        headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}
        return httpx2.Response(404, headers=headers, request=request)
    body = file.read_bytes()
    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
               "Content-Length": str(len(body))}  # fmt: skip
    content = b"" if request.method == "HEAD" else body
    return httpx2.Response(200, headers=headers, content=content, request=request)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An online-looking Hub that is the FakeHub, with an empty cache."""
    fake = FakeHub()
    # The client copied the environment into these constants at import; it reads them per call.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=5.0: True)
    original = _http._GLOBAL_CLIENT_FACTORY  # no public getter; set_client_factory is public
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake)))
    yield fake
    set_client_factory(original)


def train_on(model_id: str, concept: Path, out: Path, *extra: str) -> list[str]:
    """train_argv with a Hub id as the base model."""
    argv = train_argv(Path(), concept, out, *extra)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = model_id
    return argv


@pytest.mark.parametrize(
    "code, needle",
    [("RepoNotFound", "was not found on the Hub"), ("GatedRepo", "is gated on the Hub")],
)
def test_missing_or_gated_id_is_one_line(hub, code, needle, concept, tmp_path, run_train, capsys):
    hub.code = code
    model_id = "someone/not-a-model"
    line, _ = cli_error(run_train, capsys, train_on(model_id, concept, tmp_path / "o"))
    assert "--pretrained_model_name_or_path" in line and repr(model_id) in line
    assert needle in line
    assert hub.asked_about(model_id)  # the real client asked the (fake) Hub
    assert not (tmp_path / "o" / "stage_1").exists()


def test_inference_reports_a_missing_id_the_same_way(hub, tmp_path, capsys):
    model_id = "someone/not-a-model"
    argv = ["--pretrained_model_name_or_path", model_id, "--prompt", "a photo"]
    capsys.readouterr()
    assert inference.main([*argv, "--save_dir", str(tmp_path / "out")]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and repr(model_id) in errors[0] and "not found" in errors[0]


@pytest.mark.parametrize("removed", sorted(REMOVED_HUB_IDS))
def test_removed_id_names_its_mirror_without_asking(hub, removed, concept, tmp_path, run_train,
                                                    capsys):  # fmt: skip
    line, _ = cli_error(run_train, capsys, train_on(removed, concept, tmp_path / "o"))
    assert repr(removed) in line and repr(REMOVED_HUB_IDS[removed]) in line
    assert not hub.asked_about(removed)  # known dead: the Hub is not asked


def _fake_cache(root: Path, repo_id: str, tiny_model: Path) -> Path:
    """A Hub cache holding tiny_model as repo_id at COMMIT (refs/main) and OTHER_COMMIT."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for commit in (COMMIT, OTHER_COMMIT):
        shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


@pytest.fixture
def cache(monkeypatch, tmp_path, tiny_model):
    """HF_HUB_CACHE (and the client's copy of it, read at import) pointing at a fake cache."""
    root = _fake_cache(tmp_path / "hub", "tiny-org/tiny-sd", tiny_model)
    _fake_cache(root, "stabilityai/stable-diffusion-2-1-base", tiny_model)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


def test_base_model_source(cache, tiny_model):
    assert base_model_source(str(tiny_model)) == {
        "source": "local",
        "id": str(tiny_model.resolve()),
        "revision": None,
    }
    hub = {"source": "hub", "id": "tiny-org/tiny-sd"}
    assert base_model_source("tiny-org/tiny-sd") == {**hub, "revision": COMMIT}
    assert base_model_source("tiny-org/tiny-sd", "main") == {**hub, "revision": COMMIT}
    assert base_model_source("tiny-org/tiny-sd", OTHER_COMMIT) == {**hub, "revision": OTHER_COMMIT}
    assert base_model_source("tiny-org/uncached")["revision"] is None


def test_run_config_records_the_cached_commit(cache, concept, tmp_path, run_train):
    out = tmp_path / "run"
    argv = train_on("tiny-org/tiny-sd", concept, out, "--stages", "1", "--ti_train_steps", "1")
    assert run_train(argv) == 0
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["base_model"] == {"source": "hub", "id": "tiny-org/tiny-sd", "revision": COMMIT}


def test_a_cached_copy_of_a_removed_id_still_loads(cache):
    m = load_base_model("stabilityai/stable-diffusion-2-1-base", local_files_only=True)
    assert m.unet.config.cross_attention_dim == m.text_encoder.config.hidden_size


# SDXL checkpoints whose ids hold no delimited "xl": only their files tell the family.
MISLEADING_SDXL = ["SG161222/RealVisXL_V4.0", "segmind/SSD-1B",
                   "playgroundai/playground-v2-1024px-aesthetic"]  # fmt: skip


def _dry_run_plan(run_train, capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert run_train([*argv, "--dry_run"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("model_id", MISLEADING_SDXL)
def test_an_uncached_hub_sdxl_is_told_by_its_downloaded_files_not_its_name(
    hub, model_id, tiny_sdxl, concept, tmp_path, run_train, capsys
):
    hub.served[model_id] = tiny_sdxl
    argv = train_on(model_id, concept, tmp_path / "o")
    argv = argv[: argv.index("--resolution")]  # the defaults show
    plan = _dry_run_plan(run_train, capsys, argv)
    assert plan["family"] == "sdxl" and plan["family_guess"] is None
    assert plan["resolution"] == 128  # the tiny U-Net's sample_size 16 x the VAE's 8
    assert all(s["gradient_accumulation_steps"] == 4 for s in plan["stages"])  # SDXL's layout
    assert "docs/sdxl.md" in plan["method_source"]
    assert any(u.endswith("/resolve/main/model_index.json") for u in hub.urls)  # not cached
    assert not any(u.endswith(".safetensors") for u in hub.urls)  # configs only, no weights


def test_a_misleading_hub_id_loads_as_sdxl_from_a_fake_cache(monkeypatch, tmp_path, tiny_sdxl):
    root = _fake_cache(tmp_path / "hub", "segmind/SSD-1B", tiny_sdxl)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    m = load_base_model("segmind/SSD-1B", local_files_only=True)
    assert m.family == "sdxl" and hasattr(m.text_encoder, "tokenizer_2")  # both encoders


def test_an_unreadable_hub_id_is_an_error_in_a_run_and_a_stated_guess_in_a_dry_run(
    concept, tmp_path, run_train, capsys, monkeypatch
):
    model_id = "SG161222/RealVisXL_V4.0"  # not cached, and HF_HUB_OFFLINE forbids the Hub
    argv = train_on(model_id, concept, tmp_path / "o")
    plan = _dry_run_plan(run_train, capsys, argv[: argv.index("--resolution")])
    assert plan["family"] == "sd2" and plan["resolution"] == 512
    assert f"guessed from the name {model_id!r}" in plan["family_guess"]
    assert "resolution: the family's default 512, a guess" in plan["family_guess"]

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded for a family guessed from the name")

    monkeypatch.setattr(models, "_load_parts", no_weights)
    line, _ = cli_error(run_train, capsys, argv)  # stops before any weight loads
    assert repr(model_id) in line and "HF_HUB_OFFLINE" in line
    assert not (tmp_path / "o").exists()


def test_a_run_refuses_defaults_resolved_before_its_files_became_readable(
    monkeypatch, tmp_path, tiny_sdxl, concept, run_train, capsys
):
    """The Hub answered only after the flags were resolved (from a guess): no run on those."""
    model_id = "segmind/SSD-1B"
    argv = train_on(model_id, concept, tmp_path / "o", "--stages", "1")
    cfg, ns = train_attndreambooth.parse_args(argv)  # offline: sd2, guessed from the name
    assert cfg.family == "sd2" and cfg.family_guess is not None
    root = _fake_cache(tmp_path / "hub", model_id, tiny_sdxl)  # now readable: SDXL
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(train_attndreambooth, "parse_args", lambda argv: (cfg, ns))
    line, _ = cli_error(run_train, capsys, argv)
    assert "defaults were resolved while the model's files could not be read" in line
    assert not (tmp_path / "o" / "stage_1").exists()


def test_the_config_fetch_honours_revision_and_local_files_only(hub, tiny_sdxl):
    model_id = "segmind/SSD-1B"
    hub.served[model_id] = tiny_sdxl
    with pytest.raises(FilesUnreadable, match="--local_files_only forbids asking the Hub"):
        base_facts(model_id, local_files_only=True)
    assert not hub.asked_about(model_id)
    assert base_facts(model_id, revision="v2").family == "sdxl"
    assert any(u.endswith(f"{model_id}/resolve/v2/model_index.json") for u in hub.urls)


def test_an_uncached_hub_sdxl_trains_as_sdxl(hub, tiny_sdxl, concept, tmp_path, run_train):
    """The crash this prevents: SD defaults and one text encoder, at the first U-Net forward."""
    model_id = "segmind/SSD-1B"
    hub.served[model_id] = tiny_sdxl
    out = tmp_path / "o"
    steps = ["--stages", "1", "--ti_train_steps", "1", "--ti_gradient_accumulation_steps", "1"]
    assert run_train(train_on(model_id, concept, out, *steps)) == 0
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["family"] == "sdxl" and cfg["base_model"]["revision"] == COMMIT
