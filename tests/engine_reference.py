"""Reference runs for "the engine redesign changed no result": one short CPU run per method on the demo data.

`tests/data/engine_reference.json` holds the metrics these runs gave on the code before the redesign (main at
f8d4a79, recorded with `python tests/engine_reference.py --record OUT.json`); `test_engine_reference.py` runs them
again and compares. CPU, one torch thread, `train.loader_workers=0`: the conditions under which a run is exactly
reproducible.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

# Timing and bookkeeping values that are not results.
NOT_RESULTS = ("train/images_per_s",)

COMMON = [
    "data.image_size=16",
    "model.backbone=small_cnn",
    "train.steps=12",
    "train.batch_size=8",
    "train.eval_every=4",
    "train.checkpoint_every=6",
    "train.lr=0.003",
    "train.device=cpu",
    "train.loader_workers=0",
    "data.fraction=0.25",
    "seed=3",
]

# name -> (dataset, extra overrides)
CASES: dict[str, tuple[str, list[str]]] = {
    "supervised": ("breakhis", ["method.name=supervised"]),
    "supervised_noaug": ("breakhis", ["method.name=supervised", "train.augment=none"]),
    "pseudo_label": ("breakhis", ["method.name=pseudo_label", "method.params.threshold=0.6"]),
    "fixmatch": (
        "breakhis",
        ["method.name=fixmatch", "method.params.threshold=0.6", "train.unlabeled_ratio=2"],
    ),
    "mean_teacher": ("breakhis", ["method.name=mean_teacher", "method.params.rampup_steps=4"]),
    "mean_teacher_weak": (
        "breakhis",
        [
            "method.name=mean_teacher",
            "method.params.student_view=weak",
            "method.params.evaluate_teacher=false",
        ],
    ),
    "gan_ssl": (
        "breakhis",
        ["method.name=gan_ssl", "method.params.image_size=16", "method.params.generator_width=8"],
    ),
    "finetune": ("breakhis", ["method.name=finetune", "method.params.probe_steps=6"]),
    "supervised_chest": ("chestxray14", ["method.name=supervised"]),
    "fixmatch_chest": ("chestxray14", ["method.name=fixmatch", "method.params.threshold=0.7"]),
}


def case_config(name: str, roots: dict[str, Path]):
    from semimed.config import load_config

    dataset, extra = CASES[name]
    return load_config(None, [f"data.dataset={dataset}", f"data.root={roots[dataset]}", *COMMON, *extra])


def run_case(name: str, roots: dict[str, Path], run_dir: Path) -> dict[str, Any]:
    from semimed.experiment import run_training

    final = run_training(case_config(name, roots), run_dir, show_progress=False)
    return {k: v for k, v in final.items() if k not in NOT_RESULTS}


def jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def record(out: Path) -> None:
    import torch

    from semimed.data.demo import write_demo

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        roots = write_demo(Path(tmp) / "demo", seed=0)
        results = {name: jsonable(run_case(name, roots, Path(tmp) / name)) for name in CASES}
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--record":
        sys.exit("usage: python tests/engine_reference.py --record OUT.json")
    record(Path(sys.argv[2]))
