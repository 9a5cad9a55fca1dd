"""The dataset registry: every registered dataset declares a complete spec, loads a tiny on-disk instance of its
real format through `load_dataset(DataConfig)`, and its options reach the config and the CLI.

A new dataset fails `test_every_dataset_has_a_tiny_instance` until it adds a writer to TINY below.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from semimed.cli import build_parser, main
from semimed.config import DataConfig, load_config
from semimed.data import DATASETS, DatasetSpec, dataset_spec, load_dataset
from semimed.data.base import LabeledImageSet
from semimed.errors import SemimedError
from semimed.prepare import check_totals, prepare


def _medmnist(tmp_path: Path, demo_roots: dict[str, Path]) -> Path:
    """A BreastMNIST-format file: 8/4/4 images of 28 px, labels alternating 0/1 (the release's 2 classes)."""
    path = tmp_path / "breastmnist.npz"
    arrays = {}
    for split, count in (("train", 8), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = np.stack([np.full((28, 28), i, np.uint8) for i in range(count)])
        arrays[f"{split}_labels"] = (np.arange(count) % 2).reshape(-1, 1)
    np.savez_compressed(path, **arrays)
    return path


def _imagefolder(tmp_path: Path, demo_roots: dict[str, Path]) -> Path:
    """Your own class folders: <root>/<class>/<image>.png, 3 grayscale images per class."""
    from PIL import Image

    for name in ("benign", "malignant"):
        (tmp_path / "folders" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(
                tmp_path / "folders" / name / f"{i}.png"
            )
    return tmp_path / "folders"


def _csv(tmp_path: Path, demo_roots: dict[str, Path]) -> Path:
    """A manifest (path,label,patient_id) beside the class folders of `_imagefolder`."""
    root = _imagefolder(tmp_path, demo_roots)
    rows = [f"{c}/{i}.png,{c},p{c}{i}" for c in ("benign", "malignant") for i in range(3)]
    (root / "manifest.csv").write_text("path,label,patient_id\n" + "\n".join(rows) + "\n")
    return root / "manifest.csv"


# name -> (tmp_path, demo_roots) -> data.root of a tiny instance in the dataset's real on-disk format.
TINY: dict[str, Callable[[Path, dict[str, Path]], Path]] = {
    "breakhis": lambda tmp_path, demo_roots: demo_roots["breakhis"],
    "chestxray14": lambda tmp_path, demo_roots: demo_roots["chestxray14"],
    "csv": _csv,
    "imagefolder": _imagefolder,
    "medmnist": _medmnist,
}

NAMES = DATASETS.names()


def test_the_registry_holds_the_five_datasets() -> None:
    assert NAMES == ["breakhis", "chestxray14", "csv", "imagefolder", "medmnist"]
    assert "breakhis" in DATASETS and "isic" not in DATASETS
    with pytest.raises(
        SemimedError,
        match=r"unknown data\.dataset 'isic'; valid: breakhis, chestxray14, csv, imagefolder, medmnist",
    ):
        dataset_spec("isic")


@pytest.mark.parametrize("name", NAMES)
def test_every_dataset_has_a_tiny_instance(name: str) -> None:
    assert name in TINY, f"add a writer of a tiny {name} instance (its real on-disk format) to TINY"


@pytest.mark.parametrize("name", NAMES)
def test_spec_is_complete(name: str) -> None:
    spec = dataset_spec(name)
    assert isinstance(spec, DatasetSpec) and spec.name == name
    assert callable(spec.load) and callable(spec.check_release)
    assert dataclasses.is_dataclass(spec.options) and spec.options.__dataclass_params__.frozen
    assert spec.tasks and spec.default_task in spec.tasks and len(set(spec.tasks)) == len(spec.tasks)
    for text in (spec.description, spec.root_help, spec.task_help, spec.release, spec.split_rule):
        assert text.strip() and "\n" not in text
    assert isinstance(spec.patient_level, bool)
    hints = typing.get_type_hints(spec.options)
    for item in spec.option_fields():
        assert item.metadata["help"].strip(), item.name
        # What the CLI can make a flag of (a list[str] flag takes "A,B").
        assert hints[item.name] in (str, int, float, bool, list[str]), item.name
        if "choices" in item.metadata:
            assert item.default in item.metadata["choices"], item.name
    # prepare() takes options as keyword arguments beside its own
    own = set(inspect.signature(prepare).parameters) - {"options"}
    assert not own & {item.name for item in spec.option_fields()}


def test_patient_level_accuracy_is_for_breakhis_only() -> None:
    # Several images per patient and one label per image: BreakHis. ChestX-ray14 is multi-label; a MedMNIST
    # file has no patient ids (each image is its own patient, so patient accuracy would equal accuracy).
    assert {name: dataset_spec(name).patient_level for name in NAMES} == {
        "breakhis": True,
        "chestxray14": False,
        "csv": False,
        "imagefolder": False,
        "medmnist": False,
    }


@pytest.mark.filterwarnings("ignore:no positive training image")
@pytest.mark.parametrize("name", NAMES)
def test_tiny_instance_loads_through_load_dataset(
    name: str, tmp_path: Path, demo_roots: dict[str, Path]
) -> None:
    spec = dataset_spec(name)
    root = TINY[name](tmp_path, demo_roots)
    default = DataConfig(dataset=name, root=str(root))
    assert default.task == spec.default_task and default.options == spec.default_options()
    for task in spec.tasks:
        data_cfg = DataConfig(dataset=name, root=str(root), task=task)
        dataset = load_dataset(data_cfg)
        assert isinstance(dataset, LabeledImageSet) and dataset.name == name
        assert len(dataset) > 0 and len(dataset.labels) == len(dataset.meta)
        assert dataset.meta["patient_id"].notna().all()
        pixels = dataset.read_image(0)
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == dataset.channels
        totals = check_totals(dataset, data_cfg)
        assert totals["found"] == {"images": len(dataset), "patients": len(set(dataset.patients.astype(str)))}
        assert totals["complete"] is False or totals["expected"]["images"] == len(dataset)


def test_options_reach_the_loader(demo_roots: dict[str, Path]) -> None:
    forty = load_dataset(
        DataConfig(dataset="breakhis", root=str(demo_roots["breakhis"]), options={"magnification": 40})
    )
    assert set(forty.meta["magnification"]) == {40}
    pa = load_dataset(
        DataConfig(dataset="chestxray14", root=str(demo_roots["chestxray14"]), options={"view": "PA"})
    )
    assert set(pa.meta["view"]) == {"PA"}
    everything = load_dataset(DataConfig(dataset="chestxray14", root=str(demo_roots["chestxray14"])))
    assert len(pa) == int((everything.meta["view"] == "PA").sum()) < len(everything)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("name", NAMES)
def test_every_option_is_a_config_key_with_its_choices_enforced(name: str) -> None:
    spec = dataset_spec(name)
    for item in spec.option_fields():
        default = spec.default_options()[item.name]  # a list option's default comes from its factory
        cfg = load_config(None, [f"data.dataset={name}", f"data.options.{item.name}={default}"])
        assert cfg.data.options[item.name] == default
        if "choices" in item.metadata:
            with pytest.raises(
                SemimedError, match=rf"unknown data\.options\.{item.name} 'nonsense'; valid: "
            ):
                load_config(None, [f"data.dataset={name}", f"data.options.{item.name}=nonsense"])
    with pytest.raises(SemimedError, match=rf"unknown option data\.options\.zzz for dataset '{name}'"):
        load_config(None, [f"data.dataset={name}", "data.options.zzz=1"])


# ---------------------------------------------------------------------------------------------------- CLI


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices[command]


@pytest.mark.parametrize("command", ["split", "prepare"])
def test_every_option_is_a_flag_with_help(command: str) -> None:
    parser = _subparser(command)
    flags = {flag: action for action in parser._actions for flag in action.option_strings}
    (positional,) = [a for a in parser._actions if a.dest == "dataset"]
    assert list(positional.choices) == NAMES
    for action in parser._actions:
        assert action.help, action.dest
    for name in NAMES:
        for item in dataset_spec(name).option_fields():
            flag = "--" + item.name.replace("_", "-")
            assert flag in flags and item.metadata["help"] in flags[flag].help
    task_help = flags["--task"].help
    assert all(task in task_help for name in NAMES for task in dataset_spec(name).tasks)


@pytest.mark.parametrize("name", NAMES)
def test_a_flag_of_another_dataset_is_refused(name: str, tmp_path: Path, capsys) -> None:
    own = {item.name for item in dataset_spec(name).option_fields()}
    foreign = sorted(
        {item.name for other in NAMES if other != name for item in dataset_spec(other).option_fields()} - own
    )
    assert foreign  # every dataset here lacks some other dataset's option
    option = foreign[0]
    spec = dataset_spec(next(o for o in NAMES if option in {i.name for i in dataset_spec(o).option_fields()}))
    field = next(item for item in spec.option_fields() if item.name == option)
    flag = "--" + option.replace("_", "-")
    value = [] if typing.get_type_hints(spec.options)[option] is bool else [str(field.default)]
    for argv in (
        ["split", name, "--root", str(tmp_path), "--out", str(tmp_path / "s.json"), flag, *value],
        [
            "prepare",
            name,
            "--root",
            str(tmp_path),
            "--size",
            "16",
            "--out",
            str(tmp_path / "c"),
            flag,
            *value,
        ],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{flag}: not an option of dataset {name!r}" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())
