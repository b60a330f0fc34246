"""Issue 28, item 6: a learned embedding of several vectors is one key holding (n, dim), the
layout diffusers' load_textual_inversion reads; loaded in plain diffusers with token=X, a
prompt saying X is conditioned exactly as our renderer conditions '{}'. Files of the earlier
layout (a key per vector, safetensors or the original's pickled .bin) are still read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import train_argv
from safetensors.torch import load_file, save_file

import train_attndreambooth
from attn_utils.config import ConfigError, vector_tokens
from attn_utils.render.export import build_pipeline, load_concept, resolve_source
from attn_utils.render.renderer import fill
from attn_utils.runfiles import load_embeddings, save_embeddings
from attn_utils.tiny import SDXL_WIDTHS, TINY_CATEGORY

NAME = "new_concept"  # --placeholder_token's default
TOKENS = vector_tokens(NAME, 2)  # new_concept_v0, new_concept_v1


@pytest.fixture(scope="module")
def two_vector_run(tiny_model, concept, tmp_path_factory) -> Path:
    """Stage 1 of AttnDreamBooth with --n_object_embedding 2 ('wombat' is 'wom' + 'bat')."""
    out = tmp_path_factory.mktemp("two") / "run"
    argv = train_argv(tiny_model, concept, out, "--stages", "1", "--category", "wombat",
                      "--n_object_embedding", "2")  # fmt: skip
    assert train_attndreambooth.main(argv) == 0
    return out


def _encode(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings, pooled or None) as the pipeline conditions its U-Net on them."""
    kw = {"device": torch.device("cpu"), "num_images_per_prompt": 1}
    out = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, **kw)
    return out[0], (out[2] if len(out) == 4 else None)  # SDXL: (embeds, neg, pooled, neg)


def _ours(**source) -> tuple[object, str]:
    """Our renderer's pipeline for a concept, and what it makes of 'a photo of {}'."""
    src = resolve_source(**source)
    return build_pipeline(load_concept(src)), fill("a photo of {}", src.tokens, src.prompt_category)


def _plain_diffusers(model: Path, path: Path, token: str | None, sdxl: bool):
    """The base pipeline with the file loaded as diffusers' docs (and docs/sdxl.md) load it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if not sdxl:
        pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)
        pipe.load_textual_inversion(str(path), **({"token": token} if token else {}))
        return pipe
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model))
    state = load_file(str(path))
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)  # fmt: skip
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)  # fmt: skip
    return pipe


def _assert_same_conditioning(ours, our_prompt: str, theirs, their_prompt: str) -> None:
    (a, pooled_a), (b, pooled_b) = _encode(ours, our_prompt), _encode(theirs, their_prompt)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    if pooled_a is not None:
        torch.testing.assert_close(pooled_b, pooled_a, rtol=0, atol=0)


def test_a_trained_two_vector_file_is_one_key_and_plain_diffusers_conditions_as_we_do(
    two_vector_run, tiny_model
):
    path = two_vector_run / "stage_1" / "learned_embeds.safetensors"
    state = load_file(str(path))
    assert list(state) == [NAME] and state[NAME].shape == (2, 32)
    assert not torch.equal(state[NAME][0], state[NAME][1])
    # our loader gives the rows back under the run's tokens
    rows = load_embeddings(path, dim=32)
    assert list(rows) == TOKENS and all(torch.equal(rows[t], state[NAME][i]) for i, t in
                                        enumerate(TOKENS))  # fmt: skip
    ours, our_prompt = _ours(run_dir=str(two_vector_run))
    assert our_prompt == "a photo of new_concept_v0 new_concept_v1 wombat"
    for token in (None, "my_wombat"):  # the file's key, or a name of the caller's choice
        x = token or NAME
        theirs = _plain_diffusers(tiny_model, path, token, sdxl=False)
        ids = theirs.tokenizer.convert_tokens_to_ids([x, f"{x}_1"])
        table = theirs.text_encoder.get_input_embeddings().weight
        assert torch.equal(table[ids], state[NAME])  # diffusers' x, x_1 hold rows 0, 1
        _assert_same_conditioning(ours, our_prompt, theirs, f"a photo of {x} wombat")


@pytest.mark.parametrize("n", [1, 2])
def test_sdxl_file_loads_in_plain_diffusers_with_one_token_name(tiny_sdxl, tmp_path, n):
    """docs/sdxl.md: clip_l and clip_g loaded with token='new_concept', then prompt with it."""
    path = tmp_path / "learned_embeds.safetensors"
    rows = torch.randn(n, sum(SDXL_WIDTHS), generator=torch.Generator().manual_seed(n))
    save_embeddings(path, vector_tokens(NAME, n), rows, widths=SDXL_WIDTHS)
    ours, our_prompt = _ours(model=str(tiny_sdxl), embedding_path=str(path), category=TINY_CATEGORY)
    assert our_prompt == f"a photo of {' '.join(vector_tokens(NAME, n))} {TINY_CATEGORY}"
    theirs = _plain_diffusers(tiny_sdxl, path, NAME, sdxl=True)
    names = [NAME] + [f"{NAME}_{i}" for i in range(1, n)]
    for te, tok, part in ((theirs.text_encoder, theirs.tokenizer, rows[:, : SDXL_WIDTHS[0]]),
                          (theirs.text_encoder_2, theirs.tokenizer_2,
                           rows[:, SDXL_WIDTHS[0] :])):  # fmt: skip
        ids = tok.convert_tokens_to_ids(names)
        assert torch.equal(te.get_input_embeddings().weight[ids], part)
    _assert_same_conditioning(ours, our_prompt, theirs, f"a photo of {NAME} {TINY_CATEGORY}")


def test_a_one_vector_sd_file_keeps_its_layout_and_loads_under_the_same_token_name(
    tiny_model, tmp_path
):
    path = tmp_path / "one.safetensors"
    row = torch.randn(1, 32, generator=torch.Generator().manual_seed(3))
    save_embeddings(path, vector_tokens(NAME, 1), row)
    assert {k: v.shape for k, v in load_file(str(path)).items()} == {"new_concept_v0": (32,)}
    ours, our_prompt = _ours(
        model=str(tiny_model), embedding_path=str(path), category=TINY_CATEGORY
    )
    theirs = _plain_diffusers(tiny_model, path, NAME, sdxl=False)  # token= renames it
    _assert_same_conditioning(ours, our_prompt, theirs, f"a photo of {NAME} {TINY_CATEGORY}")


def test_files_of_the_earlier_layout_are_still_read(two_vector_run, tmp_path):
    """A key per vector (this library's earlier files, the original's pickled .bin): the same
    tokens and rows, from --learned_embedding_path and from a run folder."""
    new = two_vector_run / "stage_1" / "learned_embeds.safetensors"
    rows = load_file(str(new))[NAME]  # (2, dim)
    per_token = {t: rows[i].clone() for i, t in enumerate(TOKENS)}
    old = {"old.safetensors": None, "zip.bin": True, "legacy.bin": False}
    for name, zipped in old.items():
        if zipped is None:
            save_file(per_token, str(tmp_path / name))
        else:
            torch.save(per_token, tmp_path / name, _use_new_zipfile_serialization=zipped)
    want = load_embeddings(new, dim=32)
    for name in old:
        got = load_embeddings(tmp_path / name, dim=32)
        assert list(got) == TOKENS and all(torch.equal(got[t], want[t]) for t in TOKENS), name
    run = tmp_path / "run"
    shutil.copytree(two_vector_run, run)
    shutil.copy(tmp_path / "old.safetensors", run / "stage_1" / "learned_embeds.safetensors")
    legacy = {"run_dir": str(two_vector_run), "embedding_path": str(tmp_path / "legacy.bin")}
    for source in ({"run_dir": str(run)}, legacy):
        concept = load_concept(resolve_source(**source))
        table = concept.text_encoder.get_input_embeddings().weight
        assert concept.source.tokens == TOKENS
        assert torch.equal(table[concept.token_ids], rows), source


def test_a_name_given_twice_is_one_line_and_odd_token_lists_are_not_saved(tmp_path):
    path = tmp_path / "twice.safetensors"
    save_file({NAME: torch.zeros(2, 32), "new_concept_v1": torch.ones(32)}, str(path))
    with pytest.raises(ConfigError, match=rf"^{path}: holds 'new_concept_v1' twice"):
        load_embeddings(path)
    with pytest.raises(ValueError, match="<name>_v0"):
        save_embeddings(tmp_path / "x.safetensors", ["a", "b"], torch.zeros(2, 32))
