"""Hub ids: removed, missing and gated ones are one clear line; a cached one records its commit.

The Hub client's HTTP session is replaced by a fake that answers as the Hub does (404
RepoNotFound, 403 GatedRepo), so huggingface_hub, transformers and diffusers run their real
code paths with no network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx2
import pytest
from conftest import cli_error, train_argv
from huggingface_hub import constants, set_client_factory
from huggingface_hub.utils import _http

import inference
from attn_utils import models
from attn_utils.models import REMOVED_HUB_IDS, base_model_source, load_base_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


class FakeHub:
    """Answers every request with the Hub's error for `code`; remembers the URLs asked."""

    def __init__(self) -> None:
        self.code, self.urls = "RepoNotFound", []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.urls.append(str(request.url))
        status = 403 if self.code == "GatedRepo" else 404
        return httpx2.Response(status, headers={"X-Error-Code": self.code}, request=request)

    def asked_about(self, repo_id: str) -> bool:
        return any(repo_id in url for url in self.urls)


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
