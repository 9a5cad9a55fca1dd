"""Run folders and outputs are never silently rewritten (issue "No silent wrong answers, round two").

- a finished run is kept byte for byte: an identical rerun returns its metrics, a rerun over changed data is a
  new run (the identity holds a data fingerprint), another config is refused;
- predict/explain/split never write over a run's own files;
- run and experiment names stay inside output_dir / --storage; `sweep --resume` of nothing creates nothing;
- output paths that are files, folders of the wrong kind or read-only, and unreachable storage, are one line
  naming the path, checked before any work;
- a garbage checkpoint is "not a semimed checkpoint" in semimed's words (never torch's weights_only advice).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from semimed import files, storage
from semimed.cli import main
from semimed.config import load_config
from semimed.data.base import LabeledImageSet
from semimed.errors import SemimedError
from semimed.experiment import run_training

pytestmark = [
    pytest.mark.filterwarnings("ignore:.* is undefined:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:val/.* was never defined:RuntimeWarning"),
]
DEMO_NPZ = Path(__file__).parents[1] / "semimed" / "demo_data" / "breastmnist.npz"
TINY = [
    "data.dataset=medmnist",
    "model.backbone=small_cnn",
    "data.image_size=16",
    "train.steps=2",
    "train.eval_every=2",
    "train.batch_size=8",
    "train.device=cpu",
    "train.loader_workers=0",
]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and mtime: 'nothing was touched' made checkable."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """One finished tiny run (the only training of this file) on a private copy of the demo .npz."""
    root = tmp_path_factory.mktemp("outputs")
    npz = root / "data" / "breastmnist.npz"
    npz.parent.mkdir()
    shutil.copy2(DEMO_NPZ, npz)
    overrides = [*TINY, f"data.root={npz}", f"output_dir={root / 'runs'}", "name=run"]
    folder = root / "runs" / "run"
    run_training(load_config(None, overrides), folder, show_progress=False)
    return {"root": root, "npz": npz, "folder": folder, "overrides": overrides}


def config(finished: dict, *extra: str):
    return load_config(None, [*finished["overrides"], *extra])


def write_png(path: Path, size: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), 128, dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------- a finished run is kept


def same(a: dict, b: dict) -> bool:
    """Equal keys and values, NaN equal to NaN."""
    return a.keys() == b.keys() and all(
        a[k] == b[k]
        or (isinstance(a[k], float) and isinstance(b[k], float) and math.isnan(a[k]) and math.isnan(b[k]))
        for k in a
    )


def test_an_identical_rerun_keeps_the_finished_run_byte_for_byte(finished, capsys) -> None:
    folder = finished["folder"]
    before = snapshot(folder)
    # metrics.json's nulls are NaN again, as a fresh run returns them (finished_metrics)
    reported = {
        k: math.nan if v is None and "/" in k else v
        for k, v in json.loads((folder / "metrics.json").read_text()).items()
    }
    assert any(isinstance(v, float) and math.isnan(v) for v in reported.values()), (
        "the run has an undefined metric"
    )
    received = []
    again = run_training(config(finished), folder, report=lambda *r: received.append(r), show_progress=False)
    assert same(again, reported)  # its own results, val/* and train/* included: not a re-scoring
    [(final, checkpoint)] = received  # a Tune trial still reports its result once
    assert same(final, {**reported, "final": True}) and checkpoint is None
    assert f"run {folder} is finished (metrics.json); its results are kept" in capsys.readouterr().err
    assert snapshot(folder) == before


def test_a_rerun_over_changed_data_is_a_new_run_refused_untouched(finished, capsys) -> None:
    """The same path with other pixels re-scored the finished run in place (test AUC 0.620 -> 0.437)."""
    folder, npz = finished["folder"], finished["npz"]
    before = snapshot(folder)
    pristine = npz.with_suffix(".orig")
    shutil.copy2(npz, pristine)
    try:
        arrays = dict(np.load(npz))
        for key in [k for k in arrays if k.endswith("_images")]:
            arrays[key] = (255 - arrays[key]).astype(np.uint8)
        np.savez(npz, **arrays)
        with pytest.raises(SemimedError) as error:
            run_training(config(finished), folder, show_progress=False)
        message = str(error.value)
        assert "\n" not in message and message.startswith(
            f"{folder} holds another run (data fingerprint changed: "
        )
        assert f"{npz} " in message and "this is a new run: use another name" in message.lower()
        # The same through the CLI's resume of the run's own config.
        capsys.readouterr()
        assert main(["train", str(folder / "config.yaml"), "--local", "--resume"]) == 2
        assert "data fingerprint changed" in capsys.readouterr().err
    finally:
        shutil.copy2(pristine, npz)  # bytes and mtime back: the other tests see the run's own data
    assert snapshot(folder) == before


def test_another_config_in_the_finished_run_is_refused_untouched(finished) -> None:
    before = snapshot(finished["folder"])
    with pytest.raises(SemimedError, match=r"holds another run \(train.lr 0.001 → 0.5\)"):
        run_training(config(finished, "train.lr=0.5"), finished["folder"], show_progress=False)
    assert snapshot(finished["folder"]) == before


def test_the_data_fingerprint_of_a_folder_dataset_follows_each_file(tmp_path: Path) -> None:
    from semimed.runs import RunIdentity, data_fingerprint

    names = ["a/1.png", "a/2.png", "b/3.png"]
    for name in names:
        write_png(tmp_path / name)
    dataset = LabeledImageSet(
        name="folder",
        task="t",
        root=tmp_path,
        classes=["x", "y"],
        multilabel=False,
        labels=np.array([0, 1, 0]),
        meta=pd.DataFrame({"path": names, "patient_id": ["p1", "p2", "p3"]}),
    )
    first = data_fingerprint(dataset)
    assert first == data_fingerprint(dataset) and first["files"] == 3 and first["rows"] == 3
    stat = (tmp_path / "a/2.png").stat()
    os.utime(tmp_path / "a/2.png", ns=(stat.st_atime_ns, stat.st_mtime_ns - 10**9))  # an older mtime only
    second = data_fingerprint(dataset)
    assert second["sha256"] != first["sha256"]
    old, new = RunIdentity({}, "s", {}, first), RunIdentity({}, "s", {}, second)
    assert old.fingerprint != new.fingerprint
    (change,) = old.differences(new)
    assert change.startswith("data fingerprint changed: 3 rows in 3 file(s)")
    assert change.endswith("(another file changed or was renamed)")


# ------------------------------------------------------------------------------ nothing writes over a run's files


def test_predict_explain_and_split_refuse_a_runs_own_files(finished, capsys) -> None:
    from semimed.runs import run_owning

    folder = finished["folder"]
    image = write_png(finished["root"] / "images" / "x.png")
    before = snapshot(folder)
    for target in ("metrics.json", "predictions.parquet", "checkpoints/step_0000002/state.pt"):
        assert main(["predict", str(folder), "--images", str(image), "--out", str(folder / target)]) == 2
        assert (
            f"--out {folder / target}: that is one of the files of the run {folder}"
            in capsys.readouterr().err
        )
    assert main(["explain", str(folder), "--images", str(image), "--out", str(folder / "checkpoints")]) == 2
    assert f"inside the files of the run {folder}" in capsys.readouterr().err
    npz = finished["npz"]
    assert main(["split", "medmnist", "--root", str(npz), "--out", str(folder / "split.json")]) == 2
    assert f"one of the files of the run {folder}" in capsys.readouterr().err
    assert snapshot(folder) == before
    assert run_owning(folder / "tb" / "events") == folder and run_owning(folder / "predict.csv") is None


# --------------------------------------------------------------------------------- names stay inside their root


@pytest.mark.parametrize("name", ["../escaped", "sub/run", "ABSOLUTE"])
def test_a_run_name_that_leaves_output_dir_is_refused(finished, tmp_path: Path, capsys, name: str) -> None:
    name = str(tmp_path / "absolute") if name == "ABSOLUTE" else name
    outputs = tmp_path / "runs"
    code = main(
        ["train", str(finished["folder"] / "config.yaml"), "--local", f"output_dir={outputs}", f"name={name}"]
    )
    assert code == 2
    assert f"name={name!r}: must be one folder name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing made, inside or outside


def search_space(tmp_path: Path, npz: Path, name: str = "study") -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(
        f"name: {name}\n"
        f"base:\n  data: {{dataset: medmnist, root: {npz}, image_size: 16}}\n"
        "  model: {backbone: small_cnn}\n  train: {steps: 2, eval_every: 2, batch_size: 8, device: cpu}\n"
        "grid:\n  seed: [0]\n"
    )
    return path


@pytest.fixture
def no_ray(monkeypatch):
    """These sweeps must stop before Ray starts (and so stop fast on code that would start it)."""
    import semimed.train

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(semimed.train, "init_ray", refuse)


def test_an_experiment_name_that_leaves_storage_is_refused(finished, tmp_path: Path, capsys, no_ray) -> None:
    space = search_space(tmp_path, finished["npz"], name="../escaped")
    assert main(["sweep", str(space), "--storage", str(tmp_path / "st"), "--dry-run"]) == 2
    assert "name='../escaped': must be one folder name" in capsys.readouterr().err


def test_resuming_a_sweep_that_does_not_exist_creates_nothing(
    finished, tmp_path: Path, capsys, no_ray
) -> None:
    space = search_space(tmp_path, finished["npz"])
    assert main(["sweep", str(space), "--storage", str(tmp_path / "st"), "--resume"]) == 2
    assert f"{tmp_path / 'st' / 'study'}: no experiment to resume" in capsys.readouterr().err
    assert not (tmp_path / "st").exists()


# ------------------------------------------------------------------------------------------------ output paths


def test_output_paths_of_the_wrong_kind_are_one_line_errors(finished, tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    run_config = str(finished["folder"] / "config.yaml")
    image = str(write_png(tmp_path / "x.png"))
    npz, run = str(finished["npz"]), str(finished["folder"])
    cases = [
        (
            ["train", run_config, "--local", f"output_dir={a_file}", "name=r"],
            f"output_dir {a_file}: is a file",
        ),
        (
            ["train", run_config, "--local", f"output_dir={a_file}/sub", "name=r"],
            f"output_dir {a_file}/sub: cannot be made: {a_file} is a file, not a folder",
        ),
        (["predict", run, "--images", image, "--out", str(tmp_path)], f"--out {tmp_path}: is a folder"),
        (
            ["predict", run, "--images", image, "--out", f"{a_file}/p.csv"],
            f"--out {a_file}/p.csv: cannot be written: {a_file} is a file",
        ),
        (["split", "medmnist", "--root", npz, "--out", str(tmp_path)], f"--out {tmp_path}: is a folder"),
        (
            ["split", "medmnist", "--root", npz, "--out", f"{a_file}/s.json"],
            f"--out {a_file}/s.json: cannot be written: {a_file} is a file",
        ),
        (
            ["prepare", "medmnist", "--root", npz, "--size", "16", "--out", str(a_file)],
            f"--out {a_file}: is a file",
        ),
        (
            ["prepare", "medmnist", "--root", npz, "--size", "16", "--out", f"{a_file}/c"],
            f"--out {a_file}/c: cannot be made: {a_file} is a file",
        ),
        (["report", str(a_file)], f"experiment folder {a_file}: is a file, not a folder"),
    ]
    for argv, said in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "x.png"]


def test_read_only_output_folders_are_refused(finished, tmp_path: Path, capsys, monkeypatch) -> None:
    # The tests run as root, for whom chmod 0555 does not stop a write: the check asks os.access, patched here to
    # answer as it would for an ordinary user on a read-only folder.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    with pytest.raises(SemimedError, match=f"^out {locked}/new: folder not writable \\({locked}, where"):
        files.check_output_dir(locked / "new", "out")
    with pytest.raises(SemimedError, match=f"^out {locked}/p.csv: cannot be written: folder {locked} is not"):
        files.check_output_file(locked / "p.csv", "out")
    outputs = locked / "runs"
    code = main(
        ["train", str(finished["folder"] / "config.yaml"), "--local", f"output_dir={outputs}", "name=r"]
    )
    assert code == 2 and f"output_dir {outputs}: folder not writable" in capsys.readouterr().err
    assert main(["report", str(locked)]) == 2
    assert f"experiment folder {locked}: folder not writable" in capsys.readouterr().err
    assert list(locked.iterdir()) == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_storage_that_is_a_file_or_an_unreachable_server_is_one_line(
    finished, tmp_path: Path, capsys, no_ray
) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    space = str(search_space(tmp_path, finished["npz"]))
    assert main(["sweep", space, "--storage", str(a_file)]) == 2
    assert f"--storage {a_file}: is a file, not a folder" in capsys.readouterr().err
    port = free_port()  # nothing listens there: connecting is refused at once
    uri = f"s3://bucket/results?endpoint_override=127.0.0.1:{port}&scheme=http"
    assert main(["sweep", space, "--storage", uri]) == 2
    err = capsys.readouterr().err
    assert (
        f"--storage {uri}: storage not reachable: no connection to its endpoint http://127.0.0.1:{port}"
        in err
    )
    assert err.count("\n") == 1
    assert storage.s3_endpoint("s3://b/x?endpoint_override=minio:9000") == ("https", "minio", 9000)


# ------------------------------------------------------------------------------------------------- checkpoints


def test_garbage_checkpoints_are_not_semimed_checkpoints_in_semimeds_words(finished, tmp_path: Path) -> None:
    from semimed.models.backbones import create_backbone

    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    # An unfinished run whose checkpoint is garbage: resuming it passed on torch's advice to load it with
    # weights_only=False (which would run whatever code the file holds).
    run = tmp_path / "runs" / "run"
    shutil.copytree(finished["folder"], run)
    (run / "metrics.json").unlink()
    state = run / "checkpoints" / "step_0000002" / "state.pt"
    state.write_bytes(b"\x80\x02" + garbage)
    with pytest.raises(SemimedError) as error:
        run_training(config(finished), run, show_progress=False)
    message = str(error.value)
    assert message.startswith(f"{state}: not a semimed checkpoint (") and "weights_only" not in message
    assert "\n" not in message

    # The same bytes as model.pretrained_checkpoint, and bytes that are no torch file at all.
    for name, data in (("pickled.pt", b"\x80\x02" + garbage), ("random.pt", garbage)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SemimedError) as error:
            create_backbone("small_cnn", num_classes=2, checkpoint=str(tmp_path / name))
        message = str(error.value)
        assert (
            message.startswith(f"{tmp_path / name}: not a torch checkpoint (")
            and "weights_only" not in message
        )
    assert "not a file torch.save writes" in message  # random.pt: told apart by its first bytes
