"""One method of the toy study, alone, with the study's budget:

    python -m attn_utils.toyworld train --method ti --name dotted_cup --out runs/toy

writes the concept's 64 px photos as the study does (OUT/photos/<name>/, OUT/concepts.json)
and runs train_attndreambooth.py with exactly the flags `python -m attn_utils.toyworld study`
gives that method (study.method_flags and study.train_flags, put together by the study's own
study_plan.train_argv), into the folder the study would train it in
(OUT/concepts/<name>/run for attndreambooth, run-<method> for the others).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from attn_utils.evaluate import study_plan
from attn_utils.toyworld.concepts import CONCEPTS
from attn_utils.toyworld.study import (
    METHODS,
    PROMPTS,
    method_flags,
    train_flags,
    write_concepts,
)


def train_argv(
    method: str, name: str, out: Path, models: Path, images: int, seed: int
) -> list[str]:
    """train_attndreambooth.py's argv for one method and concept, as the toy study builds it."""
    if method not in METHODS:
        raise ValueError(f"--method: unknown method {method!r}; known: {', '.join(METHODS)}")
    if name not in CONCEPTS:
        raise ValueError(f"--name: unknown toy concept {name!r}; known: {', '.join(CONCEPTS)}")
    out = Path(out).resolve()
    plan = study_plan.StudyPlan(
        concepts=[],
        prompt_file=str(PROMPTS),
        out=out,
        model=str(Path(models) / "base"),
        variants=[],
        train_args=train_flags(seed),
        method_args={method: method_flags(method, images)},
        seed=seed,
    )
    concept = study_plan.ConceptSpec(name, str(out / "photos" / name), CONCEPTS[name]["category"])
    return study_plan.train_argv(plan, concept, method)


def main(args) -> int:
    """`python -m attn_utils.toyworld train` (parsed in __main__.py): print, then run."""
    argv = train_argv(args.method, args.name, args.out, args.models, args.images, args.seed)
    cmd = [sys.executable, *argv]
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    write_concepts(Path(args.out).resolve(), [args.name])
    return subprocess.run(cmd, check=False).returncode
