"""load_config: YAML plus dotted overrides land typed; unknown keys, wrong types and bad YAML name the culprit."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from semimed.config import Config, DataConfig, TrainConfig, load_config, parse_override
from semimed.errors import SemimedError


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.train.steps == 500 and cfg.train.lr == 1e-3 and cfg.method.params == {}
    assert cfg.split_seed == cfg.seed == 0


def test_yaml_values_land_typed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
name: study
seed: 3
data:
  root: /data/breakhis
  fraction: 0.05
  image_size: 48
  split_seed: 7
train:
  lr: 3e-4          # YAML 1.1 reads this as a string; the config must still give a float
  steps: "200"
  milestones: [0.3, 0.6]
model:
  pretrained: false
method:
  name: supervised
  params: {}
""",
    )
    cfg = load_config(path)
    assert cfg.name == "study" and cfg.seed == 3
    assert cfg.data == DataConfig(root="/data/breakhis", fraction=0.05, image_size=48, split_seed=7)
    assert cfg.split_seed == 7
    assert cfg.train.lr == 3e-4 and type(cfg.train.lr) is float
    assert cfg.train.steps == 200 and type(cfg.train.steps) is int
    assert cfg.train.milestones == [0.3, 0.6]
    assert cfg.model.pretrained is False
    # untouched sections keep their defaults
    assert cfg.train.batch_size == TrainConfig().batch_size and cfg.scaling == Config().scaling


def test_overrides_land_typed_and_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: 0.1\n  steps: 10\n")
    cfg = load_config(
        path,
        [
            "train.lr=3e-4",
            "train.steps=250",
            "data.fraction=0.25",
            "data.split_seed=null",
            "model.pretrained=true",
            "method.params.threshold=0.9",
            "method.params.use_hard_labels=false",
            "name=ablation",
        ],
    )
    assert type(cfg.train.lr) is float and cfg.train.lr == 3e-4
    assert type(cfg.train.steps) is int and cfg.train.steps == 250
    assert cfg.data.fraction == 0.25 and cfg.data.split_seed is None
    assert cfg.model.pretrained is True
    assert cfg.method.params == {"threshold": 0.9, "use_hard_labels": False}
    assert type(cfg.method.params["threshold"]) is float
    assert cfg.name == "ablation"


def test_int_like_values_coerce_but_fractions_do_not() -> None:
    assert load_config(None, ["train.steps=100.0"]).train.steps == 100
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(SemimedError, match=r"'train\.steps': 1\.5 is not a valid int"):
        load_config(None, ["train.steps=1.5"])


def test_parse_override() -> None:
    assert parse_override("train.milestones=[0.5, 0.9]") == ("train.milestones", [0.5, 0.9])
    assert parse_override(" name = a=b") == ("name", "a=b")
    assert parse_override("data.root=") == ("data.root", "")
    with pytest.raises(SemimedError, match="override 'train.steps' must look like key=value"):
        parse_override("train.steps")


def test_exponent_override_into_params_is_a_number() -> None:
    cfg = load_config(None, ["method.params.lambda_u=1e-3"])
    assert cfg.method.params["lambda_u"] == 0.001


# ------------------------------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    ("text", "overrides", "dotted", "suggestion"),
    [
        ("trian:\n  steps: 10\n", [], "trian", "train"),
        ("seeed: 1\n", [], "seeed", "seed"),
        ("train:\n  stpes: 10\n", [], "train.stpes", "steps"),
        ("data:\n  fractoin: 0.1\n", [], "data.fractoin", "fraction"),
        ("", ["train.stpes=10"], "train.stpes", "steps"),
        ("", ["scaling.num_worker=2"], "scaling.num_worker", "num_workers"),
        ("", ["model.backbon=resnet18"], "model.backbon", "backbone"),
    ],
)
def test_unknown_key_is_named_with_a_suggestion(
    tmp_path: Path, text: str, overrides: list[str], dotted: str, suggestion: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SemimedError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert f"unknown config key {dotted!r}" in message
    assert f"did you mean {suggestion!r}?" in message


def test_unknown_key_without_close_match_lists_the_valid_ones() -> None:
    with pytest.raises(SemimedError, match=r"unknown config key 'train\.zzz'; valid: .*\bsteps\b") as info:
        load_config(None, ["train.zzz=1"])
    assert "did you mean" not in str(info.value)


# ------------------------------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    ("override", "dotted", "kind"),
    [
        ("train.steps=abc", "train.steps", "int"),
        ("train.lr=fast", "train.lr", "float"),
        ("train.lr=true", "train.lr", "float"),
        ("model.pretrained=maybe", "model.pretrained", "bool"),
        ("seed=[1, 2]", "seed", "int"),
        ("data.root={a: 1}", "data.root", "str"),
        ("data.split_seed=x", "data.split_seed", ""),
    ],
)
def test_wrong_type_names_the_key(override: str, dotted: str, kind: str) -> None:
    with pytest.raises(
        SemimedError, match=rf"config key {re.escape(repr(dotted))}: .* is not a valid {kind}"
    ):
        load_config(None, [override])


def test_wrong_type_in_file_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  steps: abc\n")
    with pytest.raises(SemimedError, match=rf"^{re.escape(str(path))}: config key 'train\.steps': 'abc'"):
        load_config(path)


def test_scalar_where_a_section_is_expected(tmp_path: Path) -> None:
    with pytest.raises(SemimedError, match="train: expected a mapping, got int"):
        load_config(write(tmp_path, "train: 5\n"))
    with pytest.raises(SemimedError, match="override 'train.lr.x': 'lr' is not a section"):
        load_config(write(tmp_path, "train:\n  lr: 0.1\n"), ["train.lr.x=1"])


def test_null_for_a_required_value(tmp_path: Path) -> None:
    with pytest.raises(SemimedError, match="config key 'train.steps' must not be empty"):
        load_config(write(tmp_path, "train:\n  steps:\n"))


def test_wrong_type_for_a_list_field() -> None:
    with pytest.raises(SemimedError, match=r"train\.milestones"):
        load_config(None, ["train.milestones=abc"])


# ------------------------------------------------------------------------------------------------ bad files


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  steps: [1, 2\n", name="broken.yaml")
    with pytest.raises(SemimedError, match=rf"^{re.escape(str(path))}: invalid YAML"):
        load_config(path)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(SemimedError, match=r"nope\.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(SemimedError, match=r"list\.yaml: expected a mapping at the top level"):
        load_config(write(tmp_path, "- 1\n- 2\n", name="list.yaml"))
    assert load_config(write(tmp_path, "", name="empty.yaml")) == Config()


# ------------------------------------------------------------------------------------------------ round trip


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "name=rt",
            "seed=4",
            "data.root=/x/y",
            "data.split_seed=11",
            "data.val_policy=fraction",
            "train.lr=3e-4",
            "train.milestones=[0.4, 0.8]",
            "train.amp=bf16",
            "model.drop_rate=0.2",
            "method.params.threshold=0.95",
            "scaling.num_workers=2",
            "scaling.gpus_per_worker=0.5",
        ],
    )
    path = cfg.save(tmp_path / "out" / "config.yaml")
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]
    loaded = load_config(path)
    assert loaded == cfg
    assert dataclasses.asdict(loaded) == yaml.safe_load(path.read_text())
    assert load_config(Config().save(tmp_path / "default.yaml")) == Config()


def test_config_is_frozen() -> None:
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- dataset options


@pytest.mark.parametrize(
    ("dataset", "task", "options"),
    [
        ("breakhis", "binary", {"magnification": "all"}),
        ("chestxray14", "findings", {"view": "all", "drop_missing": False}),
        ("medmnist", "default", {"class_names": []}),
    ],
)
def test_default_task_and_options_per_dataset(dataset: str, task: str, options: dict) -> None:
    # "" means the dataset's default task; the resolved config writes task and every option out.
    cfg = load_config(None, [f"data.dataset={dataset}"])
    assert (cfg.data.task, cfg.data.options) == (task, options)
    assert DataConfig(dataset=dataset, task="") == cfg.data


def test_options_land_typed(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  dataset: breakhis\n  options:\n    magnification: 40\n")
    assert load_config(path).data.options == {"magnification": "40"}  # YAML's int, the option's str
    cfg = load_config(
        None, ["data.dataset=chestxray14", "data.options.drop_missing=yes", "data.options.view=PA"]
    )
    assert cfg.data.options == {"view": "PA", "drop_missing": True}


def test_saved_options_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.dataset=chestxray14", "data.options.view=AP", "data.task=findings"])
    loaded = load_config(cfg.save(tmp_path / "config.yaml"))
    assert loaded == cfg and yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["options"] == {
        "view": "AP",
        "drop_missing": False,
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.options.view=PA"],
            r"unknown option data\.options\.view for dataset 'breakhis'; valid: magnification$",
        ),
        (
            ["data.dataset=chestxray14", "data.options.veiw=PA"],
            r"unknown option data\.options\.veiw for dataset 'chestxray14' \(did you mean 'view'\?\); "
            r"valid: view, drop_missing$",
        ),
        (
            ["data.dataset=medmnist", "data.options.magnification=40"],
            r"unknown option data\.options\.magnification for dataset 'medmnist'; valid: class_names$",
        ),
        (
            ["data.options.magnification=50"],
            r"unknown data\.options\.magnification '50'; valid: all, 40, 100",
        ),
        (
            ["data.dataset=chestxray14", "data.options.view=LAT"],
            r"unknown data\.options\.view 'LAT'; valid: all, PA, AP$",
        ),
        (
            ["data.dataset=chestxray14", "data.options.drop_missing=maybe"],
            r"config key 'data\.options\.drop_missing': 'maybe' is not a valid bool",
        ),
        (["data.options=3"], r"data\.options: expected a mapping, got int"),
        (
            ["data.task=findings"],
            r"unknown data\.task 'findings' for dataset 'breakhis'; valid: binary, subtype",
        ),
        (
            ["data.dataset=medmnist", "data.task=binary"],
            r"unknown data\.task 'binary' for dataset 'medmnist'",
        ),
        (
            ["data.dataset=isic"],
            r"unknown data\.dataset 'isic'; valid: breakhis, chestxray14, csv, imagefolder, medmnist$",
        ),
    ],
)
def test_bad_dataset_settings_name_the_key_and_the_valid_values(overrides: list[str], message: str) -> None:
    with pytest.raises(SemimedError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("old", "value", "dataset"),
    [
        ("magnification", "40", "breakhis"),
        ("view", "PA", "chestxray14"),
        ("drop_missing", "true", "chestxray14"),
    ],
)
def test_old_flat_dataset_keys_say_the_new_spelling(
    tmp_path: Path, old: str, value: str, dataset: str
) -> None:
    expected = rf"config key 'data\.{old}' is now 'data\.options\.{old}'"
    with pytest.raises(SemimedError, match=expected):
        load_config(None, [f"data.dataset={dataset}", f"data.{old}={value}"])
    path = write(tmp_path, f"data:\n  dataset: {dataset}\n  {old}: {value}\n")
    with pytest.raises(SemimedError, match=rf"^{re.escape(str(path))}: {expected}"):
        load_config(path)
    with pytest.raises(TypeError):
        DataConfig(dataset=dataset, **{old: value})  # type: ignore[arg-type]
