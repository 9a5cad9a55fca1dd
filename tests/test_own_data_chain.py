"""Your own images end to end, through the CLI, on the real sample images (the issue's "done when").

(a) an image folder: the uploader's 64-px ChestX-ray14 subset (NIH1000/{train,valid,test}/{0_normal,1_abnormal}),
the first images of each folder plus every other image of their patients. That subset keeps the uploader's own
leak: patients 00000116, 00000174, 00000176, 00000180 and 00000204 are in two of its split folders, so the given
split is refused with patient ids (the loader says so), and the study pools the folders
(`--split-folders pool`) with the NIH patient in the file name (`--patient-regex`): semimed draws a
patient-disjoint split, and each of those patients lands in one part.
(b) a manifest: breakhis_index.csv (path, label, patient_id, ...) cut to 3 images per patient (25 patients), the
images copied beside it; no split column, so semimed draws a patient-disjoint split by the patient_id column.

Each goes split -> prepare -> train --local -> predict -> evaluate; one sweep (a search space whose grid holds
both datasets: supervised vs FixMatch on each, in-process trials on a private local Ray) -> report. And the
README's "Your own images" commands, parsed from README.md and run as written (tiny training settings added).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from semimed.cli import main
from semimed.config import DataConfig
from semimed.data import load_dataset
from semimed.errors import SemimedError

REPO = Path(__file__).resolve().parents[1]
NIH = Path("chestxray14/images_64/NIH1000")
CLASSES = ("0_normal", "1_abnormal")
PATIENT = r"(\d{8})_\d{3}\.png$"  # NIH file names: <patient>_<follow-up>.png
CROSSING = {"00000116", "00000174", "00000176", "00000180", "00000204"}  # in two split folders of the subset
FOLDER_OPTIONS = {"patient_regex": PATIENT, "split_folders": "pool"}
TINY = [
    "model.backbone=small_cnn",
    "data.image_size=16",
    "train.steps=4",
    "train.eval_every=2",
    "train.batch_size=8",
    "train.device=cpu",
    "train.loader_workers=0",
]


def _nih_subset(sample_data: Path, root: Path, first: int = 20) -> Path:
    """<root>/{train,valid,test}/<class>/<patient>_<n>.png: the first `first` images of each of the uploader's
    folders, then every other image of those patients (wherever the uploader put it): whole patients."""
    source = sample_data / NIH
    chosen = {
        path.name[:8]
        for part in ("train", "valid", "test")
        for name in CLASSES
        for path in sorted((source / part / name).iterdir())[:first]
    }
    for path in sorted(source.glob("*/*/*.png")):
        if path.name[:8] in chosen:
            target = root / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return root


def _breakhis_manifest(sample_data: Path, root: Path, per_patient: int = 3) -> Path:
    """<root>/labels.csv: breakhis_index.csv's first `per_patient` rows of each patient, its images copied."""
    index = pd.read_csv(sample_data / "breakhis" / "breakhis_index.csv")
    rows = index.groupby("patient_id", sort=False).head(per_patient).reset_index(drop=True)
    for path in rows["path"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_data / "breakhis" / path, root / path)
    rows.to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def _flags(options: dict[str, str]) -> list[str]:
    return [item for key, value in options.items() for item in ("--" + key.replace("_", "-"), value)]


def _patient_of(kind: str, root: Path, options: dict) -> dict[str, str]:
    dataset = load_dataset(DataConfig(dataset=kind, root=str(root), options=options))
    return dict(zip(dataset.meta["path"], dataset.patients.astype(str), strict=True))


def _parts_by_patient(split: dict, patient_of: dict[str, str]) -> dict[str, set[str]]:
    """patient -> the parts (train, val, test) holding an image of theirs."""
    where: dict[str, set[str]] = {}
    for part in ("train", "val", "test"):
        for path in split[part]:
            where.setdefault(patient_of[path], set()).add(part)
    return where


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return a == pytest.approx(b, abs=1e-9)


def _data_section(kind: str, root: Path, options: dict, cache: Path) -> dict:
    return {
        "dataset": kind,
        "root": str(root),
        "options": dict(options),
        "image_size": 16,
        "fraction": 0.5,
        "cache_dir": str(cache),
    }


def _chain_until_evaluate(
    kind: str, root: Path, options: dict, positive: str, tmp_path: Path, capsys
) -> tuple[Path, dict]:
    """split -> prepare -> train --local -> predict -> evaluate for one dataset; returns (run folder, split)."""
    work = tmp_path / kind
    work.mkdir()
    patient_of = _patient_of(kind, root, options)

    # split: every image in one part, each patient in one part (ids from the regex / the patient_id column)
    split_path = work / "split.json"
    argv = ["split", kind, "--root", str(root), *_flags(options), "--fraction", "0.5", "--seed", "0"]
    assert main([*argv, "--out", str(split_path)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {split_path}" in printed
    split = json.loads(split_path.read_text())
    assert split["protocol"].startswith("patient-disjoint random") and split["classes"] == sorted(
        split["classes"]
    )
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(patient_of)
    where = _parts_by_patient(split, patient_of)
    assert all(len(parts) == 1 for parts in where.values()), {p: s for p, s in where.items() if len(s) > 1}
    assert len(set(patient_of.values())) < len(patient_of)  # patients with several images: ids matter here

    # prepare: the decode-once cache the runs below read (they decode nothing more)
    cache = work / "cache"
    assert (
        main(["prepare", kind, "--root", str(root), *_flags(options), "--size", "16", "--out", str(cache)])
        == 0
    )
    printed = capsys.readouterr().out
    assert f"decoded {len(patient_of)} image(s)" in printed
    prepared = sorted(p.name for p in cache.iterdir())
    assert len(prepared) == 1 and prepared[0].startswith(f"{kind}-16px-")

    # train --local: the split it trains on is the one `semimed split` printed (same seed and fractions)
    config = work / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": f"{kind}-fixmatch",
                "output_dir": str(work / "runs"),
                "seed": 0,
                "method": {"name": "fixmatch"},
                "data": _data_section(kind, root, options, cache),
            }
        )
    )
    assert main(["train", str(config), *TINY, "--local"]) == 0
    run = work / "runs" / f"{kind}-fixmatch"
    assert f"run directory: {run.resolve()}" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["positive_class"] == positive and metrics["step"] == 4
    trained = json.loads((run / "split.json").read_text())
    for part in ("train", "val", "test", "labeled", "unlabeled"):
        assert trained[part] == split[part], part
    assert sorted(p.name for p in cache.iterdir()) == prepared  # read the prepared cache, built no other

    # predict --root: every image, with its patient (the run's dataset options) and label
    out = work / "predict.csv"
    assert main(["predict", str(run), "--root", str(root), "--out", str(out), "--device", "cpu"]) == 0
    assert f"wrote {out}: {len(patient_of)} image(s), classes {', '.join(split['classes'])}" in (
        capsys.readouterr().out
    )
    predicted = pd.read_csv(out, dtype={"patient_id": str})
    assert dict(zip(predicted["image"], predicted["patient_id"], strict=True)) == patient_of
    if kind == "imagefolder":  # <split folder>/<class>/<image>
        truth = {path: path.split("/")[1] for path in patient_of}
    else:
        truth = dict(pd.read_csv(root)[["path", "label"]].itertuples(index=False))
    assert dict(zip(predicted["image"], predicted["label"], strict=True)) == truth
    scores = predicted[[f"score/{c}" for c in split["classes"]]].to_numpy()
    assert scores.sum(axis=1) == pytest.approx(1.0, abs=1e-5)
    # ... the run's own test scores, for its test images
    own = pd.read_parquet(run / "predictions.parquet")
    own = own[own["split"] == "test"].set_index("path")
    mine = predicted.set_index("image").loc[own.index]
    for c in split["classes"]:
        assert mine[f"score/{c}"].to_numpy() == pytest.approx(own[f"score/{c}"].to_numpy(), abs=1e-5)

    # evaluate on the run's own test part: no official split here (--split test says so, writes nothing), so
    # the run's split.json; its numbers are the run's own test numbers
    argv = ["evaluate", str(run), "--root", str(root), "--split", "test", "--out", str(work / "no")]
    assert main(argv) == 2 and "has no official test part" in capsys.readouterr().err
    assert not (work / "no").exists()
    evaluated = work / "evaluate"
    argv = ["evaluate", str(run), "--root", str(root), "--split-file", str(run / "split.json")]
    assert main([*argv, "--out", str(evaluated), "--n-boot", "50", "--device", "cpu"]) == 0
    assert f"{len(split['test'])} image(s)" in capsys.readouterr().out
    written = json.loads((evaluated / "metrics.json").read_text())
    assert written["positive_class"] == positive and written["images"] == len(split["test"])
    run_test = {k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}
    assert set(written["metrics"]) == set(run_test)
    assert {k: v for k, v in written["metrics"].items() if not _same(v, run_test[k])} == {}
    return run, split


@pytest.mark.ray
@pytest.mark.filterwarnings("ignore:precision is undefined")  # 4 steps: the model may predict one class
def test_own_images_and_a_manifest_go_through_the_whole_chain(
    sample_data: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    folder = _nih_subset(sample_data, tmp_path / "nih")
    manifest = _breakhis_manifest(sample_data, tmp_path / "bh")
    # The uploader's own split leaks patients: with ids, using it as given is refused (one line) ...
    with pytest.raises(
        SemimedError, match=r"patient '000001\d\d' is in .* the given split is not patient-disj"
    ):
        load_dataset(DataConfig(dataset="imagefolder", root=str(folder), options={"patient_regex": PATIENT}))
    patients = _patient_of("imagefolder", folder, FOLDER_OPTIONS)
    folders_of: dict[str, set[str]] = {}
    for path, patient in patients.items():
        folders_of.setdefault(patient, set()).add(path.split("/")[0])
    assert {p for p, f in folders_of.items() if len(f) > 1} == CROSSING
    # ... so the study pools the folders and semimed draws a patient-disjoint split.
    runs = {
        "imagefolder": _chain_until_evaluate(
            "imagefolder", folder, FOLDER_OPTIONS, "1_abnormal", tmp_path, capsys
        ),
        "csv": _chain_until_evaluate("csv", manifest, {}, "malignant", tmp_path, capsys),
    }
    where = _parts_by_patient(runs["imagefolder"][1], patients)
    assert all(len(where[p]) == 1 for p in CROSSING)

    # One sweep for both: grid over the data section (each dataset, its options and the prepared cache) x
    # supervised vs FixMatch at one fraction and seed, in-process trials.
    space = tmp_path / "own_data.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": "own_data",
                "base": {
                    "model": {"backbone": "small_cnn"},
                    "train": {"steps": 4, "eval_every": 2, "batch_size": 8, "loader_workers": 0},
                    "scaling": {"num_workers": 0, "cpus_per_worker": 1},
                },
                "grid": {
                    "data": [
                        _data_section(
                            "imagefolder", folder, FOLDER_OPTIONS, tmp_path / "imagefolder" / "cache"
                        ),
                        _data_section("csv", manifest, {}, tmp_path / "csv" / "cache"),
                    ],
                    "method": [{"name": "supervised"}, {"name": "fixmatch"}],
                    "seed": [0],
                },
                "max_concurrent_trials": 2,
            }
        )
    )
    results = tmp_path / "results"
    assert main(["sweep", str(space), "--storage", str(results)]) == 0
    experiment = results / "own_data"
    assert f"experiment directory: {experiment}" in capsys.readouterr().out
    assert len(list(experiment.glob("runs/*/metrics.json"))) == 4
    for trial_dir in sorted(experiment.glob("runs/*")):
        cfg = yaml.safe_load((trial_dir / "config.yaml").read_text())
        kind = cfg["data"]["dataset"]
        assert json.loads((trial_dir / "metrics.json").read_text())["step"] == 4
        trial_split = json.loads((trial_dir / "split.json").read_text())
        for part in ("train", "val", "test", "labeled"):  # the split of the trained run: same seed, fraction
            assert trial_split[part] == runs[kind][1][part], (trial_dir.name, part)
    for kind in runs:  # the trials read the prepared caches too
        assert len(list((tmp_path / kind / "cache").iterdir())) == 1

    # report: one study per dataset, each naming its positive class
    assert main(["report", str(experiment)]) == 0
    capsys.readouterr()
    report = (experiment / "report.md").read_text()
    assert report.count("## Study: ") == 2
    assert "Positive class: 1_abnormal (" in report and "Positive class: malignant (" in report
    assert "| supervised |" in report and "| fixmatch |" in report


def test_a_trial_label_fits_in_a_folder_name() -> None:
    """A grid of whole data sections (root, cache_dir, options) named each trial's run folder by all of it: over
    255 bytes, "File name too long", and every such trial failed. Cut, with a digest of the whole label."""
    from semimed.tune import trial_label

    def section(root: str) -> dict:
        return {"dataset": "imagefolder", "cache_dir": "/c" * 60, "options": FOLDER_OPTIONS, "root": root}

    cell = {"data": section("/data/site_a"), "method": {"name": "fixmatch"}, "seed": 0}
    label = trial_label(cell)
    assert len(label.encode()) == 120 and re.fullmatch(
        r"data=dataset=imagefolder\+cache_dir=_c_c_c.*~[0-9a-f]{10}", label
    )
    assert "/" not in label and label == trial_label(dict(cell))  # the same cell: the same folder (resume)
    assert trial_label({**cell, "data": section("/data/site_b")}) != label  # differ only past the cut
    assert trial_label({"method.name": "fixmatch", "data.fraction": 0.05}) == "method=fixmatch,fraction=0.05"
    wide = trial_label({"data.root": "/données/" + "é" * 200})  # cut on a character, not inside one
    assert len(wide.encode()) <= 120 and wide.startswith("root=_données_éé")


# ------------------------------------------------------------------------------------------------ the README


def _readme_commands() -> list[list[str]]:
    """The code block of README.md's "Your own images" section, one argv (without `semimed`) per command."""
    section = (REPO / "README.md").read_text().split("## Your own images", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert all(argv[0] == "semimed" for argv in commands)
    return [argv[1:] for argv in commands]


def _my_images(sample_data: Path, root: Path, per_class: int = 24) -> Path:
    """<root>/<class>/P<patient>_<n>.png: class folders without a split, named as the README's patient regex
    expects (`P0012_left.png`), from the first real X-rays of the uploader's train folders."""
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for path in sorted((sample_data / NIH / "train" / name).iterdir())[:per_class]:
            shutil.copyfile(path, root / name / f"P{path.name}")
    return root


@pytest.mark.ray
@pytest.mark.filterwarnings("ignore:precision is undefined")
def test_the_readme_your_own_images_commands_work_as_written(
    sample_data: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Each command of the README's block, from a folder that holds what a fresh clone has
    (search_spaces/your_data.yaml), the placeholders replaced by real data. Training and sweeps add the tiny
    settings, and the sweeps one fraction and seed (3 trials; `--dry-run` first checks the 27 as written)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    places = {
        "/data/my_images": str(_my_images(sample_data, tmp_path / "my_images")),
        "/data/labels.csv": str(_breakhis_manifest(sample_data, tmp_path / "bh")),
    }
    commands = _readme_commands()
    assert [argv[0] for argv in commands] == ["split", "split", "train", "sweep", "report", "sweep"]
    clone = tmp_path / "clone"
    (clone / "search_spaces").mkdir(parents=True)
    shutil.copyfile(REPO / "search_spaces" / "your_data.yaml", clone / "search_spaces" / "your_data.yaml")
    manifest_clone = tmp_path / "clone_csv"  # the manifest's sweep: the README's alternative, run on its own
    shutil.copytree(clone, manifest_clone)

    def run(argv: list[str], cwd: Path, *extra: str) -> str:
        argv = [places.get(a, a) for a in argv]
        argv = [re.sub(r"=(/data/\S+)$", lambda m: "=" + places[m.group(1)], a) for a in argv]
        assert not [a for a in argv if "/data/" in a], argv  # every placeholder is known
        monkeypatch.chdir(cwd)
        code = main([*argv, *extra])
        out, err = capsys.readouterr()
        assert code == 0, (argv, err)
        return out

    split_plain, split_regex, train, sweep, report, sweep_csv = commands
    patients = {}
    for argv, regex in ((split_plain, False), (split_regex, True)):
        out = run(argv, clone)
        split = json.loads((clone / "split.json").read_text())
        assert split["classes"] == list(CLASSES) and "note: classes (folder names, sorted)" in out
        paths = split["train"] + split["val"] + split["test"]
        assert len(paths) == 2 * 24
        if regex:  # P00000032_002.png -> P00000032: each patient in one part
            patients = {p: re.search(r"/(P\d+)_[^/]*$", p).group(1) for p in paths}
            assert len(set(patients.values())) < len(paths)
            where = _parts_by_patient(split, patients)
            assert all(len(parts) == 1 for parts in where.values())
            assert "patient-disjoint" in split["protocol"]
        else:
            assert "note: no patient ids: image-level split" in out

    out = run(train, clone, *TINY)
    assert "is a search space: semimed train uses its base config" in out
    (run_dir,) = (clone / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert metrics["positive_class"] == "1_abnormal" and metrics["step"] == 4
    assert (cfg["method"]["name"], cfg["data"]["fraction"], cfg["seed"]) == ("supervised", 0.1, 0)

    for argv, cwd, dataset, positive in (
        (sweep, clone, "imagefolder", "1_abnormal"),
        (sweep_csv, manifest_clone, "csv", "malignant"),
    ):
        out = run(argv, cwd, "--dry-run")  # as written: the README's "3 methods x 3 fractions x 3 seeds"
        assert "27 trial(s) of your_data" in out
        run(argv, cwd, *TINY, "data.fraction=0.2", "seed=0")
        runs = sorted((cwd / "results" / "your_data" / "runs").iterdir())
        assert len(runs) == 3
        for trial in runs:
            cfg = yaml.safe_load((trial / "config.yaml").read_text())
            root = places["/data/my_images" if dataset == "imagefolder" else "/data/labels.csv"]
            assert (cfg["data"]["dataset"], cfg["data"]["root"]) == (dataset, root)
            assert json.loads((trial / "metrics.json").read_text())["positive_class"] == positive
        if dataset == "imagefolder":
            out = run(report, clone)
            text = (clone / "results" / "your_data" / "report.md").read_text()
            assert "Positive class: 1_abnormal (" in text
            assert all(f"| {arm} |" in text for arm in ("supervised", "fixmatch", "mean_teacher"))
