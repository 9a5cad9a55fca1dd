"""The `semimed` commands as a user types them: output, files written, and one-line errors (exit code 2)."""

from __future__ import annotations

import json

import pytest

from semimed.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_split_prints_the_table_and_writes_json(demo_roots, tmp_path, capsys):
    out_file = tmp_path / "split.json"
    code, out, _ = run(
        capsys,
        "split",
        "breakhis",
        "--root",
        str(demo_roots["breakhis"]),
        "--fraction",
        "0.1",
        "--seed",
        "3",
        "--out",
        str(out_file),
    )
    assert code == 0
    split = json.loads(out_file.read_text())
    assert {"dataset", "task", "seed", "fraction", "train", "val", "test", "labeled", "unlabeled"} <= set(
        split
    )
    assert split["seed"] == 3 and split["fraction"] == 0.1
    assert "benign" in out and "malignant" in out and "labeled" in out and f"wrote {out_file}" in out
    # The printed table's labeled image count per class equals the JSON's
    code, _, _ = run(
        capsys,
        "split",
        "breakhis",
        "--root",
        str(demo_roots["breakhis"]),
        "--fraction",
        "0.1",
        "--seed",
        "3",
        "--out",
        str(tmp_path / "again.json"),
    )
    assert (tmp_path / "again.json").read_bytes() == out_file.read_bytes()


def test_split_with_a_dataset_option_flag(demo_roots, tmp_path, capsys):
    out_file = tmp_path / "split.json"
    code, out, _ = run(
        capsys,
        "split",
        "breakhis",
        "--root",
        str(demo_roots["breakhis"]),
        "--magnification",
        "40",
        "--task",
        "subtype",
        "--out",
        str(out_file),
    )
    assert code == 0
    split = json.loads(out_file.read_text())
    paths = split["train"] + split["val"] + split["test"]
    assert paths and all("/40X/" in path for path in paths) and split["task"] == "subtype"
    assert "split rule: random patient-disjoint" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["split", "breakhis", "--root", "{tmp}", "--out", "{tmp}/s.json"], "no BreakHis tree"),
        (
            ["split", "breakhis", "--root", "{demo}", "--fraction", "0", "--out", "{tmp}/s.json"],
            "label fraction 0.0 must be in (0, 1]",
        ),
        (
            ["split", "breakhis", "--root", "{demo}", "--fraction", "1.5", "--out", "{tmp}/s.json"],
            "label fraction 1.5 must be in (0, 1]",
        ),
        (
            ["split", "breakhis", "--root", "{demo}", "--fraction", "0.0005", "--out", "{tmp}/s.json"],
            "the smallest fraction that labels every class is",
        ),
        (
            ["split", "breakhis", "--root", "{demo}", "--view", "PA", "--out", "{tmp}/s.json"],
            "--view: not an option of dataset 'breakhis' (its options: --magnification)",
        ),
        (
            ["split", "breakhis", "--root", "{demo}", "--task", "findings", "--out", "{tmp}/s.json"],
            "unknown data.task 'findings' for dataset 'breakhis'; valid: binary, subtype",
        ),
        (
            ["prepare", "breakhis", "--root", "{demo}", "--size", "16", "--out", "{tmp}/c", "--download"],
            "--download is not available for breakhis",
        ),
        (["train", "{tmp}/c.yaml", "--local"], "unknown config key 'train.stpes'"),
        (
            ["train", "{tmp}/ok.yaml", "data.magnification=40", "--local"],
            "config key 'data.magnification' is now 'data.options.magnification'",
        ),
        (["train", "{tmp}/c.yaml", "train.stpes=5", "--local"], "unknown config key 'train.stpes'"),
        (["train", "{tmp}/ok.yaml", "method.name=fixmach", "--local"], "unknown method 'fixmach'; valid:"),
        (
            ["train", "{tmp}/ok.yaml", "model.backbone=resnet19", "--local"],
            "unknown model.backbone 'resnet19'; valid:",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_culprit(demo_roots, tmp_path, capsys, argv, message):
    (tmp_path / "c.yaml").write_text("train:\n  stpes: 5\n")
    (tmp_path / "ok.yaml").write_text(f"data:\n  root: {demo_roots['breakhis']}\n  image_size: 16\n")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{demo}", str(demo_roots["breakhis"])) for a in argv]
    if argv[0] == "train" and "c.yaml" in argv[1] and len(argv) == 4:  # the override's own typo
        argv[1] = str(tmp_path / "ok.yaml")
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("semimed: error: ") and message in err
    assert err.strip().count("\n") == 0
    assert not (tmp_path / "s.json").exists()  # nothing half-written


def test_train_local_writes_the_run_folder(demo_roots, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(
        f"name: quick\noutput_dir: {tmp_path}\ndata:\n  root: {demo_roots['breakhis']}\n  image_size: 16\n"
        "train:\n  steps: 6\n  batch_size: 8\n  eval_every: 3\n"
    )
    code, out, _ = run(capsys, "train", str(tmp_path / "c.yaml"), "--local")
    assert code == 0 and "test/balanced_accuracy" in out
    run_dir = tmp_path / "quick"
    for name in ("config.yaml", "split.json", "env.json", "metrics.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == 6


def test_ssl_at_full_labels_uses_every_training_image_as_unlabeled(demo_roots, tmp_path):
    from semimed.config import load_config
    from semimed.data import load_dataset
    from semimed.experiment import build_run, run_training

    cfg = load_config(
        None,
        [
            f"data.root={demo_roots['breakhis']}",
            "data.image_size=16",
            "data.fraction=1.0",
            "method.name=fixmatch",
            "train.steps=4",
            "train.batch_size=8",
            "train.eval_every=2",
        ],
    )
    _, data, split = build_run(cfg)
    assert split.unlabeled == []
    train_rows = split.indices(load_dataset(cfg.data))["train"]
    pool = data.unlabeled_stream([("u_weak", "weak")]).indices
    assert sorted(pool.tolist()) == sorted(train_rows.tolist())
    assert run_training(cfg, tmp_path / "run", show_progress=False)["step"] == 4
