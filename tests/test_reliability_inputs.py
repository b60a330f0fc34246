"""Issue 5, items 1-2: bad photos and bad arguments fail early and clearly."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error, train_argv
from PIL import Image, ImageFile
from safetensors.torch import load_file

from attn_utils.config import ConfigError
from attn_utils.images import data_fingerprint, load_image, load_instance_images
from attn_utils.train.data import augment

RES = 128


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _png16_rgb(path: Path, rgb: tuple[int, int, int], w: int = 160, h: int = 150) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    row = b"\x00" + struct.pack(">3H", *rgb) * w
    chunk = lambda tag, data: (struct.pack(">I", len(data)) + tag + data
                               + struct.pack(">I", zlib.crc32(tag + data)))  # fmt: skip
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * h)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _noise_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


_new = lambda mode, color: Image.new(mode, (150, 150), color)
_arr = lambda value, dtype: Image.fromarray(np.full((150, 150), value, dtype))


# name -> (image, expected RGB, tolerance); 16-bit values scale from 0..65535
# fmt: off
CONVERTIBLE = {
    "gray.jpg": (lambda: _new("L", 77), (77, 77, 77), 3),
    "bilevel.png": (lambda: _new("1", 1), (255, 255, 255), 0),
    "rgba_clear.png": (lambda: _new("RGBA", (9, 9, 9, 0)), (255, 255, 255), 0),
    "rgba_half.png": (lambda: _new("RGBA", (255, 0, 0, 128)), (255, 127, 127), 1),
    "la.png": (lambda: _new("LA", (0, 0)), (255, 255, 255), 0),
    "palette.png": (lambda: _new("RGB", (10, 200, 30)).quantize(), (10, 200, 30), 0),
    "palette_transparent.png": (lambda: _new("P", 0), (255, 255, 255), 0),  # index 0 clear
    "cmyk.jpg": (lambda: _new("CMYK", (255, 0, 0, 0)), (0, 255, 255), 3),
    "cmyk.tif": (lambda: _new("CMYK", (0, 255, 0, 0)), (255, 0, 255), 0),
    "gray16.png": (lambda: _arr(32768, np.uint16), (128, 128, 128), 0),
    "gray16_dark.png": (lambda: _arr(200, np.uint16), (1, 1, 1), 0),  # a dark photo stays dark
    "gray16.tif": (lambda: _arr(65535, np.uint16), (255, 255, 255), 0),
    "rgb16.png": ("by hand", (255, 0, 128), 0),  # Pillow cannot write 16-bit RGB
    "float.tif": (lambda: _arr(0.5, np.float32), (128, 128, 128), 0),
}
# fmt: on


@pytest.mark.parametrize("name", sorted(CONVERTIBLE))
def test_convertible_modes_become_rgb(tmp_path, name):
    make, want, tol = CONVERTIBLE[name]
    if make == "by hand":
        _png16_rgb(tmp_path / name, (65535, 0, 32896))
    else:
        make().save(tmp_path / name, **({"transparency": 0} if "transparent" in name else {}))
    img = load_image(tmp_path / name)
    assert img.mode == "RGB"
    got = np.asarray(img)[75, 75].astype(int)
    assert np.abs(got - np.array(want)).max() <= tol, (name, got, want)


@pytest.mark.parametrize("orientation,red_at", [(6, "top"), (8, "bottom"), (3, "right")])
def test_exif_orientation_is_applied(tmp_path, orientation, red_at):
    arr = np.zeros((80, 120, 3), np.uint8)  # stored: 120 wide, left half red, right half blue
    arr[:, :60] = (255, 0, 0)
    arr[:, 60:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(Image.fromarray(arr), tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    img = np.asarray(load_image(path)).astype(int)
    assert img.shape[:2] == ((80, 120) if orientation == 3 else (120, 80))
    h, w = img.shape[:2]
    probe = {"top": (10, w // 2), "bottom": (h - 10, w // 2), "right": (h // 2, w - 10)}
    y, x = probe[red_at]
    assert img[y, x, 0] > 200 and img[y, x, 2] < 60, img[y, x]


def test_non_ascii_and_undecodable_file_names(tmp_path):
    folder = tmp_path / "fotos_ñ"
    folder.mkdir()
    _save(Image.new("RGB", (150, 150), "red"), folder / "ñandú 写真.jpg")
    latin1 = folder / os.fsdecode(b"caf\xe9.png")  # not valid UTF-8 on disk
    _save(Image.new("RGB", (150, 150), "blue"), latin1)
    images, paths = load_instance_images(folder, RES)
    assert len(images) == 2 and set(paths) == {folder / "ñandú 写真.jpg", latin1}
    fp = data_fingerprint(paths)
    assert fp == data_fingerprint(paths) and len(fp) == 64
    (folder / os.fsdecode(b"broken-\xe9.jpg")).write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        load_instance_images(folder, RES)
    msg = str(e.value)
    assert "broken-\\xe9.jpg: empty file" in msg
    msg.encode("utf-8")  # printable: no lone surrogates reach the terminal


def _bad_folder(tmp_path: Path) -> tuple[Path, set[str]]:
    folder = tmp_path / "mixed"
    folder.mkdir()
    _save(Image.new("RGB", (150, 150), "green"), folder / "good.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(_noise_bytes("JPEG")[:3000])
    (folder / "truncated.png").write_bytes(_noise_bytes("PNG")[:5000])
    (folder / "notes.txt").write_text("shot on a phone")
    (folder / "fake.jpg").write_text("<html>not a photo</html>")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")  # ignored, as are hidden files and folders
    (folder / "raw").mkdir()
    return folder, {"empty.jpg", "truncated.jpg", "truncated.png", "notes.txt", "fake.jpg"}


def test_unusable_files_are_listed_one_per_line_or_skipped(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries do
    folder, bad = _bad_folder(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_instance_images(folder, RES)
    first, *lines = str(e.value).splitlines()
    assert first.startswith("--instance_data_dir: 5 unusable") and "--skip_bad_images" in first
    reasons = {Path(ln.split(": ")[0]).name: ln.split(": ", 1)[1] for ln in lines}
    assert len(lines) == len(reasons) and set(reasons) == bad
    assert reasons["empty.jpg"].startswith("empty file")
    assert "truncated" in reasons["truncated.jpg"] and "truncated" in reasons["truncated.png"]
    assert reasons["notes.txt"].startswith("not an image file")
    assert reasons["fake.jpg"].startswith("not an image")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global is left as it was
    with caplog.at_level(logging.WARNING, logger="attn_utils.images"):  # --skip_bad_images
        images, paths = load_instance_images(folder, RES, skip_bad=True)
    assert [p.name for p in paths] == ["good.jpg"] and len(images) == 1
    assert sum("skipping" in r.getMessage() for r in caplog.records) == len(bad)


def test_missing_empty_and_all_bad_folders(tmp_path):
    with pytest.raises(ConfigError, match="--instance_data_dir: .* does not exist"):
        load_instance_images(tmp_path / "nope", RES)
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="is not a folder"):
        load_instance_images(tmp_path / "file.jpg", RES)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(ConfigError, match="no usable images"):
        load_instance_images(tmp_path / "empty", RES)
    folder, _ = _bad_folder(tmp_path)
    (folder / "good.jpg").unlink()
    with pytest.raises(ConfigError, match="no usable images"):
        load_instance_images(folder, RES, skip_bad=True)


def test_small_image_is_used_with_a_warning(tmp_path, caplog):
    (tmp_path / "d").mkdir()
    _save(Image.new("RGB", (40, 30), "red"), tmp_path / "d" / "tiny.png")
    with caplog.at_level(logging.WARNING, logger="attn_utils.images"):
        images, _ = load_instance_images(tmp_path / "d", RES)
    assert any("smaller than --resolution 128" in r.getMessage() for r in caplog.records)
    for seed in range(4):
        assert augment(images[0], RES, False, random.Random(seed)).shape == (3, RES, RES)


def test_bad_photo_stops_the_cli_before_any_model_loads(run_train, capsys, caplog, tmp_path):
    folder, bad = _bad_folder(tmp_path)
    argv = train_argv(tmp_path / "no_model", folder, tmp_path / "out")
    line, err = cli_error(run_train, capsys, argv)
    assert line.startswith("error: --instance_data_dir: 5 unusable")
    for name in bad:  # one line per bad file, right after the error line
        assert sum(f"/{name}: " in ln for ln in err.splitlines()) == 1, (name, err)
    assert "--pretrained_model_name_or_path" not in err  # the model was never reached
    # with --skip_bad_images the run gets past the photos (and on to the missing model)
    line, _ = cli_error(run_train, capsys, [*argv, "--skip_bad_images"])
    assert line.startswith("error: --pretrained_model_name_or_path")
    assert sum("skipping" in r.getMessage() for r in caplog.records) == len(bad)


@pytest.mark.parametrize("extra,flag", [
    (["--category", ""], "--category"), (["--category", "   "], "--category"),
    (["--instance_prompt", "a photo of a sloth"], "--instance_prompt"),
    (["--instance_prompt", "{} and {} sloth"], "--instance_prompt"),
    (["--use_8bit_adam", "--fused_adam"], "--use_8bit_adam"),
    (["--stages", "2,3"], "--stages 2,3"), (["--stages", "4"], "--stages"),
    (["--n_object_embedding", "0"], "--n_object_embedding"),
    (["--placeholder_token", "two words"], "--placeholder_token"),
])  # fmt: skip
def test_argument_errors_come_before_model_loading(run_train, capsys, tmp_path, concept, extra,
                                                   flag):  # fmt: skip
    """A missing base model proves the order: the error is about the flag, not the model."""
    argv = train_argv(tmp_path / "no_model", concept, tmp_path / "out", *extra)
    line, _ = cli_error(run_train, capsys, argv)
    assert line.startswith(f"error: {flag}"), line


@pytest.fixture(scope="module")
def model_with_token(tiny_model, tmp_path_factory) -> Path:
    """A saved full model whose tokenizer already holds new_concept_v0."""
    from transformers import CLIPTokenizer

    copy = tmp_path_factory.mktemp("clash") / "model"
    shutil.copytree(tiny_model, copy)
    tok = CLIPTokenizer.from_pretrained(str(copy), subfolder="tokenizer")
    tok.add_tokens(["new_concept_v0"])
    tok.save_pretrained(str(copy / "tokenizer"))
    return copy


@pytest.mark.parametrize(
    "extra,start",
    [
        (["--n_object_embedding", "2"], "error: --n_object_embedding: 2 placeholder tokens"),
        (["--instance_prompt", "a photo of a {} sloth" + " in the forest" * 30],
         "error: --instance_prompt: 98 tokens"),
        (["--instance_prompt", "a {} photo of a sloth"], "error: --instance_prompt: the category"),
        ("clash", "error: --placeholder_token: 'new_concept_v0' is already in the tokenizer"),
    ],
)  # fmt: skip
def test_token_errors_are_one_line(
    run_train, capsys, tmp_path, tiny_model, concept, model_with_token, extra, start
):
    model = model_with_token if extra == "clash" else tiny_model
    extra = [] if extra == "clash" else extra
    argv = train_argv(model, concept, tmp_path / "o", "--stages", "1", *extra)
    line, _ = cli_error(run_train, capsys, argv)
    assert line.startswith(start), line
    assert not (tmp_path / "o" / "stage_1").exists()


def test_multi_token_category_trains_and_targets_its_first_sub_token(
    run_train, tmp_path, tiny_model, concept
):
    from transformers import CLIPTextModel, CLIPTokenizer

    from attn_utils.method.tokens import (
        add_placeholder_tokens,
        fill_prompt,
        prompt_positions,
        regularisation_columns,
    )

    tok = CLIPTokenizer.from_pretrained(str(tiny_model), subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(str(tiny_model), subfolder="text_encoder")
    tokens = ["new_concept_v0", "new_concept_v1"]
    ids = add_placeholder_tokens(tok, enc, tokens, "wombat")  # "wom" + "bat"
    prompt = fill_prompt("a photo of a {} wombat", tokens)
    row, s, c = prompt_positions(tok, prompt, ids, "wombat")
    assert c == s + 2 and tok.convert_ids_to_tokens(int(row[0, c])) == "wom"
    for every, cols in ((False, [s, s + 1, c]), (True, [s, s + 1, c, c + 1])):
        assert regularisation_columns(tok, prompt, ids, "wombat", every)[1].tolist() == [cols]
    table = enc.get_input_embeddings().weight
    wom, bat = tok.convert_tokens_to_ids(["wom", "bat</w>"])
    assert torch.equal(table[ids[0]], table[wom]) and torch.equal(table[ids[1]], table[bat])
    argv = train_argv(tiny_model, concept, tmp_path / "w", "--stages", "1", "--category",
                      "wombat", "--n_object_embedding", "2")  # fmt: skip
    assert run_train(argv) == 0
    saved = load_file(str(tmp_path / "w" / "stage_1" / "learned_embeds.safetensors"))
    assert list(saved) == ["new_concept"] and saved["new_concept"].shape == (2, 32)  # one key
    # the documented alternative: the mean map of all the category's sub-tokens
    argv[argv.index(str(tmp_path / "w"))] = str(tmp_path / "w_all")
    assert run_train([*argv, "--reg_category_target", "all"]) == 0
    info = json.loads((tmp_path / "w_all" / "stage_1" / "stage_info.json").read_text())
    assert (
        info["fingerprint"]
        != json.loads((tmp_path / "w" / "stage_1" / "stage_info.json").read_text())["fingerprint"]
    )
    assert (
        json.loads((tmp_path / "w_all" / "run_config.json").read_text())["reg_category_target"]
        == "all"
    )
