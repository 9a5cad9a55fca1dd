"""Regressions from an adversarial probe of the hardening round, your own data and `semimed evaluate`: each case
was a traceback, a silent overwrite, a hang or a silent wrong task before its fix. All fast (no training)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from semimed.config import load_yaml, parse_override
from semimed.data.cache.load import load_pixels
from semimed.data.imagefolder import load_imagefolder
from semimed.data.manifest import load_manifest
from semimed.errors import SemimedError
from semimed.evaluate import check_out, evaluate_run


def _tree(root: Path, classes: tuple[str, ...] = ("benign", "malignant"), per_class: int = 2) -> Path:
    """<root>/<class>/<k>.png: tiny 8x8 grayscale images, a different grey per image."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(np.full((8, 8), 40 * c + 10 * k, np.uint8)).save(root / name / f"{k}.png")
    return root


def test_a_cache_dir_that_is_a_file_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    # Was a raw FileExistsError traceback from mkdir (data.cache_dir or SEMIMED_CACHE pointing at a file).
    dataset = load_imagefolder(_tree(tmp_path / "tree"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(SemimedError, match=rf"^data\.cache_dir {a_file}: is a file, not a folder$"):
        load_pixels(dataset, 8, a_file, workers=0, progress=False)
    with pytest.raises(
        SemimedError, match=rf"^data\.cache_dir {a_file / 'sub'}: cannot be made: {a_file} is a file"
    ):
        load_pixels(dataset, 8, a_file / "sub", workers=0, progress=False)
    assert a_file.read_text() == "mine"


def test_evaluate_refuses_an_absurd_bootstrap_count_before_anything(tmp_path: Path) -> None:
    # Was a silent multi-hour (or endless) loop: --n-boot 100000000000 ran with no end in sight.
    with pytest.raises(SemimedError, match=r"^evaluate: --n-boot 100000000000 is more than 100,000"):
        evaluate_run(tmp_path / "run", tmp_path / "out", root=tmp_path / "data", n_boot=100_000_000_000)
    assert not (tmp_path / "out").exists()


def test_evaluate_out_never_overwrites_files_it_did_not_write(tmp_path: Path) -> None:
    # Was: --out at a folder holding the user's own report.md / metrics.json replaced them without a word.
    run = tmp_path / "run"
    run.mkdir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text('{"mine": 1}\n')
    (mine / "report.md").write_text("# my notes\n")
    with pytest.raises(SemimedError, match=r"^evaluate: --out .*mine: holds report\.md, which no earlier"):
        check_out(mine, run)
    assert (mine / "report.md").read_text() == "# my notes\n"
    assert (mine / "metrics.json").read_text() == '{"mine": 1}\n'
    # An earlier evaluation's folder is replaced as before, and a new or empty folder is fine.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "report.md").write_text("old\n")
    (earlier / "metrics.json").write_text(json.dumps({"run": "r", "metrics": {}, "ci95": {}, "n_boot": 10}))
    assert check_out(earlier, run) == earlier
    assert check_out(tmp_path / "new", run) == tmp_path / "new"


def test_imagefolder_refuses_a_class_folder_that_links_outside_the_root(tmp_path: Path) -> None:
    # Was accepted: only links BELOW a class folder were checked, not the class (or split) folder itself.
    elsewhere = _tree(tmp_path / "elsewhere")
    root = _tree(tmp_path / "tree", classes=("cat",))
    os.symlink(elsewhere / "malignant", root / "dog")
    with pytest.raises(
        SemimedError, match=rf"^{root / 'dog'}: link leads outside the data root {root} \(to "
    ):
        load_imagefolder(root)
    split = tmp_path / "split"
    _tree(split / "test")
    os.symlink(elsewhere, split / "train")
    with pytest.raises(
        SemimedError, match=rf"^{split / 'train' / 'benign'}: link leads outside the data root"
    ):
        load_imagefolder(split)
    # A class folder linked to a folder inside the root is still followed.
    inside = _tree(tmp_path / "inside", classes=("cat",))
    _tree(inside / ".store", classes=("dog",))  # hidden: not a class folder itself
    os.symlink(inside / ".store" / "dog", inside / "dog")
    assert load_imagefolder(inside).classes == ["cat", "dog"]


def test_csv_labels_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    # Was: 'Benign' on one row beside 'benign' made a third class (a 3-class task when common enough; else a
    # split refused with "no positive training image for: Benign", naming no file or line).
    images = _tree(tmp_path / "img", per_class=3)
    rows = [(f"img/{c}/{k}.png", c, f"p{c}{k}") for c in ("benign", "malignant") for k in range(3)]
    table = pd.DataFrame(rows, columns=["path", "label", "patient_id"])
    table.loc[4, "label"] = "Malignant"
    table.to_csv(tmp_path / "labels.csv", index=False)
    assert images.is_dir()
    with pytest.raises(
        SemimedError,
        match=r"labels\.csv line 6, column 'label': label 'Malignant' differs from 'malignant' "
        r"\(.*labels\.csv line 5\) only in letter case",
    ):
        load_manifest(tmp_path / "labels.csv")
    table.loc[4, "label"] = "malignant"
    table.to_csv(tmp_path / "labels.csv", index=False)
    assert load_manifest(tmp_path / "labels.csv").classes == ["benign", "malignant"]


def test_invalid_yaml_names_the_problem_and_its_line(tmp_path: Path) -> None:
    # Was "invalid YAML (while scanning for the next token)": PyYAML's context line, without the problem or line.
    path = tmp_path / "run.yaml"
    path.write_text("data:\n\tdataset: medmnist\n")
    with pytest.raises(
        SemimedError,
        match=rf"^{path}: invalid YAML at line 2, column 1 \(found character '\\t' that cannot start any token\)$",
    ):
        load_yaml(path)
    with pytest.raises(
        SemimedError, match=r"invalid value \(expected the node content, but found '<stream end>'\)"
    ):
        parse_override("train.milestones=[0.5,")


@pytest.mark.parametrize(
    ("flags", "why"), [(["--local"], "--local"), (["scaling.num_workers=0"], "scaling.num_workers=0")]
)
def test_train_refuses_an_address_it_would_ignore(tmp_path: Path, capsys, flags: list[str], why: str) -> None:
    # Was: `--address HEAD` with --local or scaling.num_workers=0 trained here, the cluster ignored without a word.
    from semimed.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{dataset: medmnist, root: {tmp_path / 'none.npz'}}}\noutput_dir: {tmp_path / 'runs'}\n"
    )
    assert main(["train", str(config), "--address", "10.0.0.1:6379", *flags]) == 2
    assert capsys.readouterr().err == (
        f"semimed: error: --address 10.0.0.1:6379: {why} trains in this process, without Ray, so the cluster "
        "would not be used; set scaling.num_workers=1 (or more) to train there (without --local), or drop "
        "--address\n"
    )
    assert not (tmp_path / "runs").exists()
