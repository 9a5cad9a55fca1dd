"""Smoke tests of the benchmark scripts (scripts/): each runs tiny, end to end, and returns the numbers it
prints. They assert structure and the properties a benchmark relies on (the plain loop never imports semimed;
every piece of the GPU script runs and records numbers), never a speed: tests do not time anything.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_engine  # noqa: E402
import bench_methods  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.* is undefined:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:cannot choose a threshold:RuntimeWarning"),
]


def script_env() -> dict[str, str]:
    root = str(SCRIPTS.parent)
    return {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_bench_methods_runs_fixmatch_with_device_views() -> None:
    rows = bench_methods.main(["--smoke-test", "--methods", "fixmatch", "--augment-device", "cuda"])
    assert [r["method"] for r in rows] == ["fixmatch"]
    assert rows[0]["s_per_step"] > 0 and rows[0]["images_per_step"] == "4 + 2 x 8"


def test_bench_methods_covers_every_loop_method_and_no_closed_form_one() -> None:
    names = bench_methods.loop_methods()
    assert names[0] == "supervised"  # the reference row comes first
    assert {"flexmatch", "simclr", "byol", "finetune"} <= set(names) and "classical" not in names


def test_bench_engine_returns_both_sides_and_their_ratio(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    result = bench_engine.main(
        ["--device", "cpu", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--images", "32",
         "--repeats", "1", "--json", str(out)]
    )  # fmt: skip
    assert len(result["bare_images_per_s"]) == len(result["engine_images_per_s"]) == 1
    assert result["ratio"] == pytest.approx(result["engine_images_per_s"][0] / result["bare_images_per_s"][0])
    assert json.loads(out.read_text())["ratio"] == pytest.approx(result["ratio"])


@pytest.mark.slow
def test_against_plain_runs_each_side_in_its_own_process(tmp_path: Path) -> None:
    out = tmp_path / "against.json"
    command = [sys.executable, str(SCRIPTS / "bench_against_plain.py"), "--smoke-test", "--sections"]
    done = subprocess.run(
        [*command, "--variants", "cuda", "--json", str(out)], env=script_env(), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["side"] for r in result["rows"]] == ["plain:cpu", "semimed:cuda"]
    for row in result["rows"]:
        assert len(row["wall"]) == len(row["cpu"]) == 1 and all(math.isfinite(v) for v in row["cpu"])
    plain, semimed = result["sections"]["plain:cpu"][0], result["sections"]["semimed:cuda"][0]
    assert plain["imports_semimed"] is False, "the plain side must not share anything with semimed's process"
    assert {"data", "forward", "update"} <= set(plain) and {"data", "forward", "update"} <= set(semimed)
    assert "| plain PyTorch loop |" in done.stdout


@pytest.mark.slow
def test_gpu_script_smoke_test_runs_every_piece_on_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), "--smoke-test"],
        env={**script_env(), "OUT": str(tmp_path), "PYTHON": sys.executable},
        cwd=SCRIPTS.parent, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bench_smoke.json").read_text())
    pieces = result["pieces"]
    assert set(pieces) == {
        "engine_vs_bare_resnet50", "device_augment_224", "fixmatch_step", "packed_trials", "densenet121_224",
        "engine_vs_bare_resnet50_compiled", "densenet121_224_compiled",
    }  # fmt: skip
    assert not [name for name, piece in pieces.items() if "error" in piece or "skipped" in piece]
    assert pieces["engine_vs_bare_resnet50_compiled"]["args"]["compile"] is True
    assert pieces["engine_vs_bare_resnet50_compiled"]["ratio"] > 0
    assert pieces["densenet121_224"]["study_cost"]["chestxray14_ssl"]["trials"] == 75
    assert pieces["device_augment_224"]["augment_only/strong/3ch_images_per_s"] > 0
    assert pieces["fixmatch_step"]["device_views_over_network"] > 0
    assert len(pieces["packed_trials"]["2_trials_images_per_s"]) == 2
