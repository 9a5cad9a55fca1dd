"""Synthetic demo data: real on-disk formats, deterministic bytes, idempotent writes, a class signal to learn."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from semimed.data.breakhis import SUBTYPES, load_breakhis
from semimed.data.demo import CHEST_FINDINGS, CHEST_HEADER, write_demo
from semimed.errors import SemimedError

SMALL = {"breakhis_patients": 16, "images_per_patient_per_mag": 3, "chest_patients": 40, "image_size": 32}
TINY = {"breakhis_patients": 8, "images_per_patient_per_mag": 1, "chest_patients": 10, "image_size": 16}
# The NIH header has 9 names for 11 columns: each bracketed name covers two.
CHEST_COLUMNS = [
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage Width",
    "OriginalImage Height",
    "PixelSpacing x",
    "PixelSpacing y",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_demo(tmp_path_factory.mktemp("demo"), seed=0, **SMALL)


@pytest.fixture(scope="module")
def chest(demo: dict[str, Path]) -> pd.DataFrame:
    return pd.read_csv(
        demo["chestxray14"] / "Data_Entry_2017_v2020.csv", skiprows=1, header=None, names=CHEST_COLUMNS
    )


def _hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _dark_fraction(pixels: np.ndarray) -> float:
    gray = pixels.astype(float) @ np.array([0.299, 0.587, 0.114])
    return float((gray < 120).mean())


# ------------------------------------------------------------------------------------------------------ BreakHis


def test_breakhis_tree_loads(demo: dict[str, Path]) -> None:
    ds = load_breakhis(demo["breakhis"], task="subtype")
    per_patient = 4 * SMALL["images_per_patient_per_mag"]
    assert len(ds) == SMALL["breakhis_patients"] * per_patient
    assert set(ds.meta["subtype"]) == set(SUBTYPES)
    assert set(ds.labels.tolist()) == set(range(8))
    assert sorted(set(ds.meta["magnification"])) == [40, 100, 200, 400]
    assert ds.meta["patient_id"].nunique() == SMALL["breakhis_patients"]
    assert (ds.meta.groupby("patient_id").size() == per_patient).all()
    # every image of a patient sits in that patient's one folder, under one subtype
    folders = ds.meta["path"].str.split("/").str[-3]
    assert (folders == ds.meta["patient_id"]).all()
    assert (ds.meta.groupby("patient_id")["subtype"].nunique() == 1).all()
    assert ds.meta["patient_id"].str.fullmatch(r"SOB_[BM]_(A|F|PT|TA|DC|LC|MC|PC)_1[345]-\d{4,5}[A-Z]*").all()
    # as in the real release, two patient folders share a number and differ only by the suffix
    numbers = ds.meta["patient_id"].drop_duplicates().str.extract(r"_(\d\d-\d+)[A-Z]*$")[0]
    assert numbers.duplicated().any()
    image = ds.read_image(0)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    binary = load_breakhis(demo["breakhis"])
    assert np.bincount(binary.labels).tolist() == [len(ds) // 2, len(ds) // 2]


def test_breakhis_class_signal(demo: dict[str, Path]) -> None:
    """Malignant tiles have more and larger dark nuclei: the dark-pixel fraction roughly doubles, with overlap."""
    ds = load_breakhis(demo["breakhis"])
    dark = np.array([_dark_fraction(ds.read_image(i)) for i in range(len(ds))])
    benign, malignant = dark[ds.labels == 0], dark[ds.labels == 1]
    assert malignant.mean() > 2.0 * benign.mean()
    # ...but not a perfect separator: the task should not be solved by a threshold on one statistic
    assert (malignant < np.median(benign)).any()


def test_breakhis_patient_stain(demo: dict[str, Path]) -> None:
    """One patient's images share a stain colour, so patients differ more than images within a patient."""
    ds = load_breakhis(demo["breakhis"])
    colour = np.stack([ds.read_image(i).reshape(-1, 3).mean(axis=0) for i in range(len(ds))])
    frame = pd.DataFrame(colour, columns=["r", "g", "b"]).assign(patient=ds.meta["patient_id"])
    within = frame.groupby("patient")[["r", "g", "b"]].std().mean().mean()
    between = frame.groupby("patient")[["r", "g", "b"]].mean().std().mean()
    assert between > 1.5 * within


# -------------------------------------------------------------------------------------------------- ChestX-ray14


def test_chest_csv_format(demo: dict[str, Path], chest: pd.DataFrame) -> None:
    text = (demo["chestxray14"] / "Data_Entry_2017_v2020.csv").read_text()
    lines = text.splitlines()
    assert lines[0] == CHEST_HEADER
    assert all(line.count(",") == 10 for line in lines)
    sample = os.environ.get("SEMIMED_SAMPLE_DATA")
    real = Path(sample or "", "chestxray14", "metadata", "Data_Entry_2017_v2020.csv.gz")
    if sample and real.is_file():
        import gzip

        with gzip.open(real, "rt") as handle:
            assert handle.readline().rstrip("\n") == CHEST_HEADER
    assert chest["Image Index"].is_unique
    expected = [
        f"{p:08d}_{f:03d}.png" for p, f in zip(chest["Patient ID"], chest["Follow-up #"], strict=True)
    ]
    assert chest["Image Index"].tolist() == expected
    assert chest["Patient ID"].nunique() == SMALL["chest_patients"]
    assert (chest.groupby("Patient ID").size() > 2).any()  # several follow-ups for some patients
    assert set(chest["View Position"]) == {"PA", "AP"}
    assert set(chest["Patient Gender"]) == {"M", "F"}
    assert chest["Patient Age"].between(1, 100).all()


def test_chest_findings(chest: pd.DataFrame) -> None:
    labels = chest["Finding Labels"].str.split("|")
    assert not labels.apply(lambda names: "No Finding" in names and len(names) > 1).any()
    counts = pd.Series([name for names in labels for name in names]).value_counts()
    assert set(counts.index) == {*CHEST_FINDINGS, "No Finding"} and len(CHEST_FINDINGS) == 14
    assert counts.min() >= 3 and counts["Hernia"] >= 3
    assert 0.3 < counts["No Finding"] / len(chest) < 0.7


def test_chest_lists_and_images(demo: dict[str, Path], chest: pd.DataFrame) -> None:
    root = demo["chestxray14"]
    train_val = (root / "train_val_list.txt").read_text().split()
    test = (root / "test_list.txt").read_text().split()
    assert sorted(train_val + test) == sorted(chest["Image Index"])
    patient = dict(zip(chest["Image Index"], chest["Patient ID"], strict=True))
    train_patients, test_patients = {patient[n] for n in train_val}, {patient[n] for n in test}
    assert not train_patients & test_patients
    assert 0.1 <= len(test_patients) / SMALL["chest_patients"] <= 0.3
    files = {path.name: path for path in root.glob("images_00[12]/images/*.png")}
    assert set(files) == set(chest["Image Index"])
    assert {path.parent.parent.name for path in files.values()} == {"images_001", "images_002"}
    with Image.open(files[test[0]]) as image:
        assert image.mode == "L" and image.size == (32, 32)


def test_chest_class_signal(demo: dict[str, Path], chest: pd.DataFrame) -> None:
    """Opacities (Mass, Consolidation, Effusion, Edema) brighten the lung fields over No Finding images."""
    files = {path.name: path for path in demo["chestxray14"].glob("images_00[12]/images/*.png")}

    def lung_brightness(name: str) -> float:
        pixels = np.asarray(Image.open(files[name]), dtype=float)
        size = pixels.shape[0]
        rows = slice(int(0.25 * size), int(0.7 * size))
        return float(
            np.concatenate(
                [
                    pixels[rows, int(0.2 * size) : int(0.42 * size)],
                    pixels[rows, int(0.58 * size) : int(0.8 * size)],
                ],
                axis=1,
            ).mean()
        )

    labels = chest["Finding Labels"].str.split("|")
    opaque = labels.apply(lambda names: bool({"Mass", "Consolidation", "Effusion", "Edema"} & set(names)))
    normal = chest["Finding Labels"] == "No Finding"
    bright_opaque = np.mean([lung_brightness(n) for n in chest["Image Index"][opaque]])
    bright_normal = np.mean([lung_brightness(n) for n in chest["Image Index"][normal]])
    assert bright_opaque > bright_normal + 5.0


# ------------------------------------------------------------------------------------- determinism, idempotence


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    first = _hashes(write_demo(tmp_path / "a", seed=3, **TINY)["breakhis"].parent)
    second = _hashes(write_demo(tmp_path / "b", seed=3, **TINY)["breakhis"].parent)
    other = _hashes(write_demo(tmp_path / "c", seed=4, **TINY)["breakhis"].parent)
    assert first == second and len(first) > 40
    images = {name: digest for name, digest in first.items() if name.startswith("chestxray14/images_")}
    assert all(other.get(name) != digest for name, digest in images.items())
    assert first["chestxray14/Data_Entry_2017_v2020.csv"] != other["chestxray14/Data_Entry_2017_v2020.csv"]
    assert {n for n in first if n.startswith("breakhis/")} != {n for n in other if n.startswith("breakhis/")}


def test_idempotent_and_replaces_own_output(tmp_path: Path) -> None:
    roots = write_demo(tmp_path, seed=1, **{**TINY, "breakhis_patients": 9})
    stamps = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()}
    assert write_demo(tmp_path, seed=1, **{**TINY, "breakhis_patients": 9}) == roots
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()} == stamps
    # new parameters: the old tree is replaced, not merged (no stale ninth patient)
    write_demo(tmp_path, seed=1, **TINY)
    assert load_breakhis(roots["breakhis"]).meta["patient_id"].nunique() == 8
    assert not (tmp_path / ".demo_in_progress").exists()
    assert '"breakhis_patients": 8' in (tmp_path / ".demo_complete").read_text()
    assert not [path for path in tmp_path.rglob(".*tmp*")]


def test_interrupted_run_is_redone(tmp_path: Path) -> None:
    write_demo(tmp_path, seed=2, **TINY)
    (tmp_path / ".demo_complete").rename(tmp_path / ".demo_in_progress")  # as if killed before the end
    next(tmp_path.glob("chestxray14/images_001/images/*.png")).unlink()
    write_demo(tmp_path, seed=2, **TINY)
    assert (tmp_path / ".demo_complete").is_file() and not (tmp_path / ".demo_in_progress").exists()
    listed = (tmp_path / "chestxray14" / "train_val_list.txt").read_text().split()
    assert all(next(tmp_path.glob(f"chestxray14/images_00*/images/{name}"), None) for name in listed)


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "breakhis").mkdir()
    (tmp_path / "breakhis" / "mine.txt").write_text("user data")
    with pytest.raises(SemimedError, match="breakhis: exists and was not written by write_demo"):
        write_demo(tmp_path, **TINY)
    assert (tmp_path / "breakhis" / "mine.txt").read_text() == "user data"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"breakhis_patients": 7}, "breakhis_patients=7 < 8"),
        ({"images_per_patient_per_mag": 0}, "images_per_patient_per_mag=0"),
        ({"chest_patients": 3}, "chest_patients=3"),
        ({"image_size": 8}, "image_size=8"),
    ],
)
def test_bad_parameters(tmp_path: Path, override: dict, message: str) -> None:
    with pytest.raises(SemimedError, match=message):
        write_demo(tmp_path, **{**TINY, **override})
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ `semimed demo` as a user


def _demo_lines(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    return {
        "all": lines,
        "trials": [line for line in lines if line.startswith(("start  ", "done   ", "FAILED "))],
        "verdicts": [
            line
            for line in lines
            if line.startswith("| ")
            and any(v in line for v in ("better", "worse", "no detectable difference"))
        ],
    }


@pytest.mark.ray
@pytest.mark.slow
def test_demo_smoke_test_is_quiet_and_ends_with_the_verdicts(tmp_path):
    """`semimed demo --smoke-test` as a subprocess, its stdout as a user sees it (~1 min on 2 cores)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    done = subprocess.run(
        [sys.executable, "-m", "semimed.cli", "demo", "--smoke-test", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = _demo_lines(done.stdout)
    experiment = tmp_path / "demo" / "results" / "demo_breastmnist"
    # one start and one finish line per trial (4 trials), nothing of Ray's on the terminal
    assert len(seen["trials"]) == 8 and sum(line.startswith("done   ") for line in seen["trials"]) == 4
    assert all("test roc_auc 0." in line for line in seen["trials"] if line.startswith("done"))
    for noise in (
        "View detailed results",
        "To visualize your results",
        "Trial status",
        "(semimed_trial",
        "INFO",
    ):
        assert noise not in done.stdout + done.stderr, noise
    assert done.stderr == ""
    # the report's tables with the paired verdicts (roc_auc and balanced accuracy at 2 fractions: one SSL arm)
    assert len(seen["verdicts"]) == 2 and all(
        line.startswith("| mean_teacher |") for line in seen["verdicts"]
    )
    assert "test roc_auc:" in done.stdout and "| supervised | 0." in done.stdout
    # where things are: the log, the report, TensorBoard for the experiment folder (not Ray's temp folder)
    assert (
        seen["all"][-1]
        == f"curves, PR curves, confusion matrices, metric vs label fraction: tensorboard --logdir {experiment}"
    )
    assert "Configuration for experiment" in (experiment / "sweep.log").read_text()  # Ray's table went here
    assert (experiment / "tb_report").is_dir() and (experiment / "report.md").is_file()
    # lean: no checkpoint copies in Tune's trial folders, no Tune event files; the demo's finished runs keep
    # their reported network but not their resume checkpoints
    assert not list(experiment.glob("semimed_trial_*/checkpoint_*"))
    assert len(list(experiment.glob("runs/*/backbone.safetensors"))) == 4
    assert not list(experiment.glob("runs/*/checkpoints"))
    assert not list(experiment.glob("semimed_trial_*/events.out.tfevents.*"))
    size = next(line for line in seen["all"] if line.startswith("demo finished in"))
    assert int(size.split("; ")[1].split(" MB")[0]) <= 60
    # The full demo prints the same lines plus one table row per extra arm (4 tables) and two lines per trial:
    # under 100 lines for its 27 trials.
    from semimed.demo_run import BREASTMNIST_SPACE
    from semimed.tune import load_search_space

    full = load_search_space(BREASTMNIST_SPACE)
    others = len(seen["all"]) - len(seen["trials"])
    assert others + 4 + 2 * len(full.trials) < 100, (others, len(full.trials))


def _trial(i: int, fraction: float, status: str = "PENDING"):
    from types import SimpleNamespace

    def error():
        return ValueError("labels do not fit\nsecond line")

    config = {"method": {"name": "fixmatch"}, "data.fraction": fraction, "seed": i}
    return SimpleNamespace(
        trial_id=f"t{i}",
        config=config,
        last_result={},
        status=status,
        get_pickled_error=error,
        get_error=error,
    )


def test_trial_lines_and_quiet_output(tmp_path, capfd, monkeypatch):
    """What a sweep prints (one line per trial start/finish, the cell, the metric, the count and ETA off a
    terminal) and where everything else goes (the log, written at the file-descriptor level)."""
    import pickle

    from semimed import sweep_progress as sp

    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")
    lines = sp.TrialLines(["method", "data.fraction", "seed"], total=3, metric="val/roc_auc", concurrency=2)
    log = tmp_path / "exp" / sp.LOG_FILE
    a, b, c = _trial(0, 0.05), _trial(1, 0.05), _trial(2, 1.0)
    with sp.quiet_output(log):
        os.write(1, b"a line from Ray's C++ core\n")
        os.write(2, b"a warning on stderr\n")
        print("a Python print", flush=True)
        options = sp.run_config_options(lines)
        lines.on_step_begin(0, [a, b, c])
        lines.on_trial_start(0, [a, b, c], a)
        lines.on_trial_start(0, [a, b, c], b)
        lines.on_trial_result(0, [a, b, c], a, {"final": True, "test/roc_auc": 0.81234, "val/roc_auc": 0.5})
        lines.on_trial_complete(0, [a, b, c], a)
        lines.on_trial_error(0, [a, b, c], b)
        lines.on_trial_start(0, [a, b, c], c)
        c.last_result = {"val/roc_auc": 0.7}  # no final report (e.g. stopped early): the last val value
        lines.on_trial_complete(0, [a, b, c], c)
    captured = capfd.readouterr()
    printed = captured.out.splitlines()
    assert printed[0] == "start  method=fixmatch fraction=0.05 seed=0"
    assert printed[2].startswith("done   method=fixmatch fraction=0.05 seed=0: test roc_auc 0.812  (")
    assert printed[2].endswith(" s)  [1/3, ETA 0:00]")
    assert printed[3].startswith(
        "FAILED method=fixmatch fraction=0.05 seed=1: ValueError: labels do not fit  [2/3"
    )
    assert printed[5].startswith("done   method=fixmatch fraction=1 seed=2: val roc_auc 0.700")
    assert len(printed) == 6 and captured.err == ""
    assert log.read_text().splitlines() == [
        "a line from Ray's C++ core",
        "a warning on stderr",
        "a Python print",
    ]
    # Tune's RunConfig: no TensorBoard logger (no second copy of every curve), silent tables, our callback
    assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1" and options["verbose"] == 0
    names = [type(callback).__name__ for callback in options["callbacks"]]
    assert names == ["CSVLoggerCallback", "JsonLoggerCallback", "TrialLines"]
    assert "verbose" not in sp.run_config_options(lines)  # outside quiet_output: Ray's usual output
    # Tune pickles its RunConfig into the experiment: the settings survive, the progress does not
    again = pickle.loads(pickle.dumps(lines))
    assert (again.keys, again.total, again.done) == (lines.keys, 3, 0)


def test_a_retry_line_names_the_error_before_tune_syncs_it_to_storage(tmp_path, capfd):
    """A retried trial printed "unknown error (see the log)": at `on_trial_recover` Tune has written the error
    to the trial's local folder only, and reading it back from the experiment's storage failed."""
    import cloudpickle

    from semimed import sweep_progress as sp
    from semimed.errors import SemimedError

    local = tmp_path / "error.pkl"
    local.write_bytes(cloudpickle.dumps(SemimedError("/cache/pretrain/simclr-x holds another run")))

    def not_in_storage_yet():
        raise FileNotFoundError("experiment storage has no error.pkl yet")

    trial = _trial(0, 0.25)
    trial.pickled_error_file = str(local)
    trial.get_pickled_error = trial.get_error = not_in_storage_yet
    sp.TrialLines(["method", "data.fraction", "seed"], total=1).on_trial_recover(0, [trial], trial)
    assert capfd.readouterr().out.splitlines() == [
        "retry  method=fixmatch fraction=0.25 seed=0: SemimedError: /cache/pretrain/simclr-x holds another run"
        " (it resumes from its checkpoint)"
    ]


def test_quiet_output_shows_the_log_tail_when_the_sweep_fails(tmp_path, capfd):
    from semimed import sweep_progress as sp

    log = tmp_path / sp.LOG_FILE
    with pytest.raises(RuntimeError, match="boom"), sp.quiet_output(log):
        os.write(2, b"Traceback: the trial's own error\n")
        raise RuntimeError("boom")
    err = capfd.readouterr().err
    assert f"last 1 lines of {log}" in err and "Traceback: the trial's own error" in err


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    from semimed.demo_run import MARKER, _fresh_experiment

    mine = tmp_path / "experiment"
    (mine / "runs").mkdir(parents=True)
    with pytest.raises(SemimedError, match="was not written by semimed demo"):
        _fresh_experiment(mine, print)
    (mine / MARKER).write_text("demo\n")
    _fresh_experiment(mine, print)  # its own previous run: replaced
    assert sorted(p.name for p in mine.iterdir()) == [MARKER]


def test_packaged_breastmnist_is_the_official_file():
    from semimed.data import load_dataset
    from semimed.data.medmnist import KNOWN_COUNTS
    from semimed.demo_run import breastmnist_path

    path = breastmnist_path()  # checks the MD5
    assert path.stat().st_size == 559_580
    from semimed.config import DataConfig

    dataset = load_dataset(DataConfig(dataset="medmnist", root=str(path), image_size=28))
    assert len(dataset) == sum(KNOWN_COUNTS["breastmnist"]) == 780
    assert list(dataset.classes) == ["malignant", "normal_benign"]
    assert "CC BY 4.0" in (path.parent / "README.md").read_text()
