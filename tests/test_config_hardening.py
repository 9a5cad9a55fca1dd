"""Config loading and whole-config validation: bad input fails at load or check time with one line naming the
file, key and value, before any run folder exists (issue "No silent wrong answers, round two")."""

from __future__ import annotations

import re

import pytest
import torch

from semimed.cli import main
from semimed.config import load_config, load_yaml
from semimed.errors import SemimedError
from semimed.experiment import check_config, load_split, prepare_run_dir, run_training
from semimed.methods import check_method

# A 400-byte "billion laughs": 9^9 ones through nine levels of aliases, under a valid key.
BOMB = "\n".join(
    [
        "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]",
        *(
            f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]"
            for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
        ),
        "method: {name: fixmatch, params: {x: *i}}",
    ]
)
TINY = [
    "model.backbone=small_cnn",
    "data.image_size=16",
    "data.fraction=0.3",
    "train.steps=2",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.batch_size=8",
    "train.device=cpu",
    "train.loader_workers=0",
]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("semimed: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------ the YAML loader


def test_alias_bomb_is_refused_naming_the_file(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 500
    with pytest.raises(SemimedError, match=r"bomb\.yaml: key '.*' expands to more than 100,000 values"):
        load_yaml(path)
    code, out, err = run_cli(capsys, "config", path)
    assert code == 2 and out == ""
    assert "bomb.yaml" in one_error_line(err)


def test_alias_bomb_on_the_command_line_is_refused():
    # 10^6 values in a one-line override (flow style takes anchors too)
    levels = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"{name}: &{name} [{', '.join([f'*{prev}'] * 10)}]"
        for prev, name in zip("abcde", "bcdef", strict=True)
    ]
    with pytest.raises(
        SemimedError, match=r"override 'method.params.x=.*': invalid value \(.*expands to more"
    ):
        load_config(None, ["method.params.x={" + ", ".join(levels) + "}"])


def test_self_referring_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("train:\n  milestones: &m [0.5, *m]\n")
    with pytest.raises(SemimedError, match=r"loop\.yaml: key 'train.milestones\[1\]' refers to itself"):
        load_yaml(path)


def test_a_few_anchors_aliases_and_merge_keys_still_load(tmp_path):
    path = tmp_path / "shared.yaml"
    path.write_text(
        "train: {milestones: &m [0.5, 0.75]}\n"
        "method:\n  name: fixmatch\n  params:\n    <<: &fm {threshold: 0.9, lambda_u: 1.0}\n    threshold: 0.8\n"
        "pretrain: {params: {}}\n"
    )
    cfg = load_config(path)
    assert cfg.method.params == {"threshold": 0.8, "lambda_u": 1.0} and cfg.train.milestones == [0.5, 0.75]
    check_config(cfg)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train:\n  steps: 5\nmodel:\n  backbone: small_cnn\ntrain:\n  lr: 0.1\n",
            "'train' at line 5 (first at line 1)",
        ),
        ("train:\n  steps: 5\n  lr: 0.1\n  steps: 6\n", "'train.steps' at line 4 (first at line 2)"),
        ("method: {name: fixmatch, params: {threshold: 0.9, threshold: 0.5}}\n", "'method.params.threshold'"),
    ],
)
def test_duplicate_keys_name_the_file_key_and_line(tmp_path, text, message):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(SemimedError, match=re.escape(f"dup.yaml: duplicate key {message}")):
        load_config(path)


def test_non_utf8_config_is_one_line_naming_the_file(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(SemimedError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_yaml(path)
    code, _, err = run_cli(capsys, "config", path)
    assert code == 2 and "latin1.yaml: not UTF-8" in one_error_line(err)


def test_search_spaces_use_the_same_loader(tmp_path):
    from semimed.tune import load_search_space

    path = tmp_path / "space.yaml"
    path.write_text("name: s\ngrid:\n  seed: [0, 1]\ngrid:\n  seed: [2]\n")
    with pytest.raises(SemimedError, match=r"space\.yaml: duplicate key 'grid' at line 4"):
        load_search_space(path)


# ------------------------------------------------------------------------------ `semimed config` validates


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.name=fixmtch", "unknown method 'fixmtch'; valid: .* \\(did you mean 'fixmatch'\\?\\)"),
        (
            "method.params.treshold=0.9",
            "unknown parameter\\(s\\) treshold for method 'fixmatch'.*did you mean 'threshold'",
        ),
        ("method.params.threshold=1.5", re.escape("method.params.threshold=1.5 must be in [0, 1]")),
    ],
)
def test_config_command_runs_the_train_checks(tmp_path, capsys, override, message):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: fixmatch\n")
    code, out, err = run_cli(capsys, "config", path, override)
    assert code == 2 and out == ""
    assert re.search(message, one_error_line(err))
    assert run_cli(capsys, "config", path)[0] == 0  # the file itself is fine


def test_sweep_dry_run_rejects_an_out_of_range_method_param(tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_text(
        "name: s\nbase:\n  data: {dataset: breakhis, root: /data/breakhis}\n  method: {name: fixmatch}\n"
        "grid:\n  seed: [0, 1]\n"
    )
    code, _, err = run_cli(capsys, "sweep", path, "method.params.threshold=1.5", "--dry-run")
    assert code == 2
    assert "method.params.threshold=1.5 must be in [0, 1]" in one_error_line(err)


# ---------------------------------------------------------------------------- ranges and types at load time


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=-5", "train.steps=-5 must be >= 1"),
        ("data.image_size=-4", "data.image_size=-4 must be >= 8"),
        ("data.image_size=0", "data.image_size=0 must be >= 8"),
        ("data.image_size=3", "data.image_size=3 must be >= 8"),
        ("train.lr=nan", "train.lr=nan must be a finite number > 0"),
        ("train.lr=.inf", "train.lr=inf must be a finite number > 0"),
        ("train.lr=0", "train.lr=0.0 must be > 0"),
        ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be >= 0"),
        ("train.batch_size=0", "train.batch_size=0 must be >= 1"),
        ("train.unlabeled_ratio=0", "train.unlabeled_ratio=0 must be >= 1"),
        ("train.eval_every=0", "train.eval_every=0 must be >= 1"),
        ("train.checkpoint_every=-1", "train.checkpoint_every=-1 must be >= 1"),
        ("data.fraction=0", "data.fraction=0.0 must be in (0, 1]"),
        ("data.fraction=1.5", "data.fraction=1.5 must be in (0, 1]"),
        ("data.test_fraction=1", "data.test_fraction=1.0 must be in [0, 1)"),
        ("data.val_fraction=-0.1", "data.val_fraction=-0.1 must be in [0, 1)"),
        ("train.warmup_steps=-1", "train.warmup_steps=-1 must be >= 0"),
        ("train.milestones=[0.5,1.5]", "train.milestones=[0.5, 1.5]: 1.5 must be in (0, 1)"),
        ("train.milestones=[0]", "train.milestones=[0.0]: 0.0 must be in (0, 1)"),
        ("train.grad_clip=-1", "train.grad_clip=-1.0 must be >= 0"),
        ("seed=-1", "seed=-1 must be in [0, 4294967296)"),
        ("data.split_seed=-3", "data.split_seed=-3 must be in [0, 4294967296)"),
        ("model.drop_rate=1", "model.drop_rate=1.0 must be in [0, 1)"),
        ("method.params=3", "method.params: expected a mapping, got int"),
    ],
)
def test_out_of_range_values_fail_at_load_naming_key_and_value(override, message):
    with pytest.raises(SemimedError) as info:
        load_config(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("fixmatch", {"lambda_u": "abc"}, "method.params.lambda_u: 'abc' is not a valid float"),
        ("fixmatch", {"threshold": 1.5}, "method.params.threshold=1.5 must be in [0, 1]"),
        (
            "pseudo_label",
            {"negative_threshold": -0.1},
            "method.params.negative_threshold=-0.1 must be in [0, 1]",
        ),
        ("flexmatch", {"mapping": "cubic"}, "unknown method.params.mapping 'cubic'; valid: convex, linear"),
        ("mean_teacher", {"ema_decay": 1.0}, "method.params.ema_decay=1.0 must be in [0, 1)"),
        ("mean_teacher", {"rampup_steps": 2.5}, "method.params.rampup_steps: 2.5 is not a valid int"),
        ("gan_ssl", {"image_size": 16, "generator_lr": 0}, "method.params.generator_lr=0 must be > 0"),
        ("simclr", {"temperature": 0}, "method.params.temperature=0 must be > 0"),
        ("byol", {"momentum": "fast"}, "method.params.momentum: 'fast' is not a valid float"),
        ("finetune", {"freeze_bn": "maybe"}, "method.params.freeze_bn: 'maybe' is not a valid bool"),
        (
            "classical",
            {"features": ["glcm", "lbpx"]},
            "method.params.features: ['glcm', 'lbpx'] is not a valid str; valid: glcm, lbp, hog, color, glcm_lbp",
        ),
    ],
)
def test_method_params_are_typed_and_ranged_at_config_check(name, params, message):
    with pytest.raises(SemimedError) as info:
        check_method(name, params)
    assert message in str(info.value) and "\n" not in str(info.value)
    # the same through the whole-config check that train, config and sweeps run
    flat = [
        f"method.params.{k}={v!r}" if isinstance(v, str) else f"method.params.{k}={v}"
        for k, v in params.items()
    ]
    with pytest.raises(SemimedError, match=re.escape(message)):
        check_config(load_config(None, [f"method.name={name}", "data.image_size=16", *flat]))


def test_method_params_given_as_text_are_converted_for_the_method():
    assert check_method("fixmatch", {"threshold": "0.9", "lambda_u": 2}) == {"threshold": 0.9, "lambda_u": 2}
    assert check_method("fixmatch", {"threshold": [0.9, 0.8]}) == {"threshold": [0.9, 0.8]}


def test_pretrain_params_are_named_as_such():
    cfg = load_config(None, ["pretrain.method=simclr", "pretrain.params.temperature=-1"])
    with pytest.raises(SemimedError, match=re.escape("pretrain.params.temperature=-1 must be > 0")):
        check_config(cfg)


def test_gan_ssl_image_size_must_match_the_data():
    cfg = load_config(None, ["method.name=gan_ssl", "method.params.image_size=32", "data.image_size=16"])
    with pytest.raises(
        SemimedError, match=re.escape("method.params.image_size=32 must equal data.image_size=16")
    ):
        check_config(cfg)


# ----------------------------------------------------------------------------- checks once the data is known


def test_batch_larger_than_the_training_split_is_refused_before_the_run_folder(demo_roots, tmp_path):
    base = [f"data.root={demo_roots['breakhis']}", *TINY]
    cfg = load_config(None, base)
    from semimed.data import load_dataset

    train_images = len(load_split(cfg, load_dataset(cfg.data)).train)
    too_big = load_config(None, [*base, "train.batch_size=100000"])
    message = re.escape(f"train.batch_size=100000 is larger than the training split ({train_images} images)")
    with pytest.raises(SemimedError, match=message):
        prepare_run_dir(too_big, tmp_path / "ray_run")  # what the Ray driver checks before starting workers
    # the smallest refused size, through run_training: nothing is written
    just_over = load_config(None, [*base, f"train.batch_size={train_images + 1}"])
    with pytest.raises(SemimedError, match=f"train.batch_size={train_images + 1} is larger"):
        run_training(just_over, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "ray_run").exists()


def test_image_size_the_backbone_cannot_take_is_refused_before_the_run_folder(demo_roots, tmp_path):
    cfg = load_config(None, [f"data.root={demo_roots['breakhis']}", *TINY, "model.backbone=vgg16_bn"])
    with pytest.raises(SemimedError, match="model.backbone vgg16_bn cannot take data.image_size=16 images"):
        run_training(cfg, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- the device


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as one without a GPU, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_train_on_cuda_without_a_gpu_is_one_line_and_leaves_no_folder(demo_roots, tmp_path, capsys, no_cuda):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  root: {demo_roots['breakhis']}\n")
    out_dir = tmp_path / "runs"
    argv = ["train", config, "--local", *TINY, f"output_dir={out_dir}", "name=r"]
    code, _, err = run_cli(capsys, *argv, "train.device=cuda")
    assert code == 2
    assert one_error_line(err) == (
        "semimed: error: train.device=cuda but no CUDA device is available (torch.cuda.is_available() is "
        "False); use train.device=cpu or auto"
    )
    assert not out_dir.exists()
    code, _, err = run_cli(capsys, *argv, "train.device=cuda:1")
    assert code == 2 and "train.device=cuda:1 but no CUDA device" in one_error_line(err)
    assert not out_dir.exists()


def test_predict_on_cuda_without_a_gpu_is_one_line(tmp_path, capsys, no_cuda):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    code, _, err = run_cli(capsys, "predict", run_dir, "--images", image, "--device", "cuda")
    assert code == 2
    assert "--device=cuda but no CUDA device is available" in one_error_line(err)
    code, _, err = run_cli(capsys, "predict", run_dir, "--images", image, "--device", "gpu")
    assert code == 2 and "unknown --device 'gpu'; valid: auto, cpu, cuda, cuda:N" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "x.png"] and not any(run_dir.iterdir())


# ---------------------------------------------------------------------------------- train: config errors


def test_config_error_leaves_no_run_folder_and_a_corrected_rerun_works(demo_roots, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  root: {demo_roots['breakhis']}\n")
    out_dir = tmp_path / "runs"
    argv = ["train", config, "--local", *TINY, f"output_dir={out_dir}", "name=r"]
    code, _, err = run_cli(capsys, *argv, "data.image_size=4")
    assert code == 2 and "data.image_size=4 must be >= 8" in one_error_line(err)
    assert not out_dir.exists()
    # finetune from scratch (as a reference test runs it): allowed, and said once although the config is
    # checked more than once on the way (train's own check, then build_run's)
    code, out, err = run_cli(capsys, *argv, "method.name=finetune", "method.params.probe_steps=1")
    assert code == 0 and (out_dir / "r" / "metrics.json").is_file()
    assert sum("without pretrained weights" in line for line in err.splitlines()) == 1


def test_finetune_without_pretrained_weights_warns_once(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: finetune\n")
    code, out, err = run_cli(capsys, "config", path)
    assert code == 0 and "name: finetune" in out
    warnings = [line for line in err.splitlines() if "without pretrained weights" in line]
    assert warnings == [
        "semimed: warning: method finetune without pretrained weights (model.pretrained, "
        "model.pretrained_checkpoint or pretrain.method) fine-tunes a randomly initialized network"
    ]
    code, _, err = run_cli(capsys, "config", path, "model.pretrained=true")
    assert code == 0 and "without pretrained weights" not in err
