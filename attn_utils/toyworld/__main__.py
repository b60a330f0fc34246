"""The toy world's command line: write concept folders, or a grid of world scenes with captions."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image

from attn_utils.argparsing import Parser
from attn_utils.toyworld.concepts import CONCEPTS, write_concept
from attn_utils.toyworld.draw import render
from attn_utils.toyworld.world import caption, scenes


def build_parser() -> Parser:
    """The parser: one subcommand per job (concepts, samples, pretrain, study, train, ...)."""
    p = Parser(prog="python -m attn_utils.toyworld", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("concepts", help="write each concept's folder of photos")
    c.add_argument("--out", required=True, help="folder to hold one folder per concept")
    c.add_argument("--name", action="append", help="a concept to write (repeatable; default all)")
    c.add_argument("--size", type=int, default=128, help="photo side in pixels")
    c.add_argument("--seed", type=int, default=0, help="poses and places")
    s = sub.add_parser("samples", help="write grid.png and captions.txt of world scenes")
    s.add_argument("--out", required=True, help="folder for grid.png and captions.txt")
    s.add_argument("--n", type=int, default=16, help="how many scenes")
    s.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    s.add_argument("--size", type=int, default=64, help="each scene's side in pixels")
    t = sub.add_parser("pretrain", help="pretrain the toy base model, toy CLIP and oracle")
    t.add_argument("--work", required=True, help="folder for data, checkpoints and phase files")
    t.add_argument("--out", default="models/toyworld", help="where the exported models go")
    t.add_argument("--seed", type=int, default=0, help="data, initialisation and every step")
    t.add_argument("--checkpoint_every", type=int, default=200, help="steps between checkpoints")
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed: results "
                   "depend on it)")  # fmt: skip
    t.add_argument("--quick", action="store_true", help="a smoke run of every phase")
    t.add_argument("--scenes", type=int, default=0, help="override the number of scenes")
    from attn_utils.toyworld.study import DEFAULT_METHODS, METHODS, MODELS, PROMPTS

    st = sub.add_parser("study", help="evaluate.py study on the toy world: the paper in miniature")
    st.add_argument("--out", required=True, help="the study's folder")
    st.add_argument("--name", action="append", help="a concept (repeatable; default all)")
    st.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated")
    st.add_argument("--images", type=int, default=1000, help="instance images each method "
                    "trains on, per concept (its steps are scaled to it)")  # fmt: skip
    st.add_argument("--images_per_prompt", type=int, default=2, help="renders per prompt")
    st.add_argument("--seed", type=int, default=0, help="the trainings' seed; image i of every "
                    "prompt uses seed + i")  # fmt: skip
    st.add_argument("--models", type=Path, default=MODELS, help="the toy models' folder")
    st.add_argument("--prompts", type=Path, default=PROMPTS, help="the study's prompt file")
    st.add_argument("--processes", type=int, default=2, help="evaluate.py study processes, "
                    "each with cores/processes torch threads; they split the (concept, method) "
                    "units (use 1 on a machine with one GPU)")  # fmt: skip
    st.add_argument("--dry_run", action="store_true", help="print the evaluate.py command")
    tr = sub.add_parser("train", help="one method of the study alone, with the study's budget")
    tr.add_argument("--method", required=True, choices=METHODS, help="a method or an ablation")
    tr.add_argument("--name", required=True, choices=sorted(CONCEPTS), help="the concept")
    tr.add_argument("--out", required=True, help="the folder: photos/, concepts/<name>/run*/")
    tr.add_argument("--images", type=int, default=1000, help="instance images it trains on "
                    "(its steps are scaled to it, as in the study)")  # fmt: skip
    tr.add_argument("--seed", type=int, default=0, help="the training's seed")
    tr.add_argument("--models", type=Path, default=MODELS, help="the toy models' folder")
    tr.add_argument("--dry_run", action="store_true", help="print the training command only")
    b = sub.add_parser("baseline", help="render an inference.py folder's prompts with the base")
    b.add_argument("--base", type=Path, default=MODELS / "base", help="the base model folder")
    b.add_argument("--images", type=Path, required=True, help="an inference.py --save_dir")
    b.add_argument("--category", required=True, help="the word that replaces {}")
    b.add_argument("--out", type=Path, required=True, help="the folder to render into")
    o = sub.add_parser("overview", help="the demo's picture: photos, base and learned renders")
    o.add_argument("--concept_dir", type=Path, required=True, help="the concept's photos")
    o.add_argument("--images", type=Path, required=True, help="an inference.py --save_dir")
    o.add_argument("--base_images", type=Path, required=True, help="a `baseline` --out")
    o.add_argument("--category", required=True, help="the concept's category word")
    o.add_argument("--out", type=Path, required=True, help="the picture to write")
    j = sub.add_parser("judge", help="train the concept judge, measure it, write it")
    j.add_argument("--out", default="models/toyworld/judge", help="the judge's folder (its "
                   "files join a manifest.json beside it)")  # fmt: skip
    j.add_argument("--base", type=Path, default=MODELS / "base", help="the base model (its VAE)")
    j.add_argument("--seed", type=int, default=0, help="initialisation and every step")
    j.add_argument("--steps", type=int, default=1500, help="training steps (batch 64)")
    j.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed: results "
                   "depend on it)")  # fmt: skip
    v = sub.add_parser("verify", help="check shipped models against their manifest.json")
    v.add_argument("--out", default="models/toyworld", help="the folder holding manifest.json")
    return p


def write_samples(out: Path, n: int, seed: int, size: int) -> None:
    """grid.png (row-major, ceil(sqrt(n)) columns) and captions.txt (one line per scene)."""
    world = scenes(seed, n)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = Image.new("RGB", (cols * size, rows * size), (255, 255, 255))
    for i, scene in enumerate(world):
        grid.paste(render(scene, size), ((i % cols) * size, (i // cols) * size))
    out.mkdir(parents=True, exist_ok=True)
    grid.save(out / "grid.png")
    (out / "captions.txt").write_text("".join(caption(s) + "\n" for s in world), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Parse argv and write what the subcommand says."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in (
        "n",
        "size",
        "checkpoint_every",
        "threads",
        "images",
        "images_per_prompt",
        "steps",
    ):
        if isinstance(getattr(args, flag, 1), int) and getattr(args, flag, 1) < 1:
            parser.error(f"--{flag}: must be at least 1, got {getattr(args, flag)}")
    out = Path(args.out)
    if args.command == "pretrain":
        from attn_utils.toyworld.pretrain import main as pretrain

        pretrain(args)
        return
    if args.command == "study":
        from attn_utils.toyworld.study import main as study

        for name in args.name or []:
            if name not in CONCEPTS:
                parser.error(f"--name: unknown toy concept {name!r}; known: {', '.join(CONCEPTS)}")
        try:
            sys.exit(study(args))
        except ValueError as e:
            parser.error(str(e))
    if args.command == "train":
        from attn_utils.toyworld.method_run import main as train

        sys.exit(train(args))
    if args.command in ("baseline", "overview"):
        from attn_utils.config import ConfigError
        from attn_utils.toyworld import overview

        try:
            if args.command == "baseline":
                overview.render_baseline(args.base, args.images, args.category, args.out)
            else:
                overview.write_overview(
                    args.concept_dir, args.images, args.base_images, args.category, args.out
                )
        except ConfigError as e:
            parser.error(str(e))
        print(f"wrote {args.out}")
        return
    if args.command == "judge":
        from attn_utils.toyworld.judge import main as judge

        if not (args.base / "vae" / "config.json").is_file():
            parser.error(f"--base: {args.base / 'vae' / 'config.json'} does not exist")
        judge(out, args.base, args.seed, args.steps, args.threads)
        return
    if args.command == "verify":
        from attn_utils.toyworld.export import verify

        verify(out)
        return
    if args.command == "samples":
        write_samples(out, args.n, args.seed, args.size)
        print(f"wrote {args.n} scenes to {out / 'grid.png'} and {out / 'captions.txt'}")
        return
    names = args.name or sorted(CONCEPTS)
    for name in names:
        if name not in CONCEPTS:  # checked before any folder is written
            parser.error(f"--name: unknown toy concept {name!r}; known: {', '.join(CONCEPTS)}")
    for name in names:
        print(f"wrote {write_concept(name, out, args.size, args.seed)}")


if __name__ == "__main__":
    main(sys.argv[1:])
