"""Reference runs for "a refactor changes no result": one short CPU run per method on the demo data.

`tests/data/engine_reference.json` holds, per case, what these runs gave: the per-step training curves
(`train/*` at every step, from the run's TensorBoard), the test scores of every image at the reported checkpoint
(predictions.parquet) and the final metrics (metrics.json). `test_engine_reference.py` runs them again and
compares each with a tolerance measured across CPU kernels (its docstring).

CPU, one torch thread, `train.loader_workers=0`: the conditions under which a run is exactly reproducible on
one machine. Other CPUs (other SIMD kernels, another BLAS code path) drift in the last bits, and the drift grows
with the steps; that is why the comparison is not bitwise.

    python tests/engine_reference.py --record OUT.json        # record (what tests/data/engine_reference.json is)
    python tests/engine_reference.py --drift REFERENCE.json   # run again and print the largest drift per kind
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
    "train.eval_every=4",  # the log interval is eval_every // 4 = 1: the curves hold every step
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
    """{"final": metrics.json's values, "curves": {train/<key>: [value at step 1..N]}, "test_scores": [[...]]}."""
    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from semimed.experiment import run_training

    final = run_training(case_config(name, roots), run_dir, show_progress=False)
    board = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    board.Reload()
    curves = {
        tag: [float(event.value) for event in sorted(board.Scalars(tag), key=lambda e: e.step)]
        for tag in board.Tags()["scalars"]
        if tag.startswith("train/") and tag not in NOT_RESULTS
    }
    frame = pd.read_parquet(run_dir / "predictions.parquet")
    test = frame[frame["split"] == "test"].sort_values("row")
    scores = test[[c for c in frame.columns if c.startswith("score/")]].to_numpy().tolist()
    return {
        "final": {k: v for k, v in final.items() if k not in NOT_RESULTS},
        "curves": curves,
        "test_scores": scores,
    }


def jsonable(value: Any) -> Any:
    """NaN and inf as JSON null, recursively."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run_all() -> dict[str, Any]:
    import torch

    from semimed.data.demo import write_demo

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        roots = write_demo(Path(tmp) / "demo", seed=0)
        return {name: jsonable(run_case(name, roots, Path(tmp) / name)) for name in CASES}


def drift(reference: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per case, the largest |new - reference| of each kind: curve (relative, per step), test scores (absolute),
    final metrics (absolute), and whether any integer-valued entry (steps) differs."""
    out = {}
    for name, ref in reference.items():
        if name.startswith("_"):
            continue
        got = new[name]
        curve = [
            abs(a - b) / max(abs(b), 1e-12)
            for tag, values in ref["curves"].items()
            for a, b in zip(got["curves"][tag], values, strict=True)
        ]
        scores = [
            abs(a - b)
            for r1, r2 in zip(got["test_scores"], ref["test_scores"], strict=True)
            for a, b in zip(r1, r2, strict=True)
        ]
        metric = [
            abs(got["final"][k] - v)
            for k, v in ref["final"].items()
            if isinstance(v, float) and isinstance(got["final"].get(k), float)
        ]
        steps = [k for k in ("selected_step", "step") if got["final"][k] != ref["final"][k]]
        out[name] = {
            "curve_rel": max(curve),
            "curve_rel_first4": max(
                abs(a - b) / max(abs(b), 1e-12)
                for tag, values in ref["curves"].items()
                for a, b in zip(got["curves"][tag][:4], values[:4], strict=True)
            ),
            "scores_abs": max(scores),
            "metric_abs": max(metric),
            "steps_differ": steps,
        }
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("--record", "--drift"):
        sys.exit("usage: python tests/engine_reference.py --record OUT.json | --drift REFERENCE.json")
    if sys.argv[1] == "--record":
        Path(sys.argv[2]).write_text(json.dumps(run_all(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {sys.argv[2]}")
    else:
        reference = json.loads(Path(sys.argv[2]).read_text())
        for name, values in drift(reference, jsonable(run_all())).items():
            print(json.dumps({"case": name, **values}))
