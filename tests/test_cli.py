"""The `semimed` commands as a user types them: output, files written, and one-line errors (exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from semimed.cli import main

REPO = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------------------------ help and discoverability


def _subcommands(parser):
    import argparse

    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: sub for action in actions for name, sub in action.choices.items()}


def test_every_option_and_argument_of_every_command_has_help():
    """Walks the parser: each option and positional of `semimed` and of every subcommand has a description."""
    import argparse

    from semimed.cli import build_parser

    parser = build_parser()
    commands = _subcommands(parser)
    assert {"split", "prepare", "train", "sweep", "report", "demo", "predict", "config", "explain"} <= set(
        commands
    )
    missing = []
    for name, sub in [("semimed", parser), *commands.items()]:
        assert sub.format_help()  # renders
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help and action.help.strip()) or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"no help text: {missing}"
    # ...and every subcommand has its line in `semimed --help`.
    listed = {
        a.dest: a.help
        for sub in parser._actions
        if isinstance(sub, argparse._SubParsersAction)
        for a in sub._choices_actions
    }
    assert set(listed) == set(commands) and all(help_text for help_text in listed.values())


@pytest.mark.parametrize(
    ("command", "option", "choices"),
    [
        ("split", "--val-policy", {"full", "fraction", "none"}),
        ("split", "--task", {"binary", "subtype", "findings"}),
        ("jobs", "action", {"list", "logs", "stop"}),
    ],
)
def test_closed_sets_are_choices(command, option, choices):
    from semimed.cli import build_parser

    sub = _subcommands(build_parser())[command]
    action = next(a for a in sub._actions if option in a.option_strings or a.dest == option)
    assert choices <= set(action.choices)


def test_bad_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["split", "breakhis", "--root", ".", "--val-policy", "sometimes", "--out", "x.json"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err


def test_version(capsys):
    from semimed import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"semimed {__version__}"


def test_config_prints_the_effective_config_as_yaml(capsys):
    import yaml

    from semimed.config import Config, config_from_dict

    code, out, _ = run(capsys, "config", "--defaults")
    assert code == 0 and yaml.safe_load(out) == Config().to_dict()
    code, out, _ = run(capsys, "config", "train.steps=7", "method.name=fixmatch")
    values = yaml.safe_load(out)
    assert code == 0 and values["train"]["steps"] == 7 and values["method"]["name"] == "fixmatch"
    code, out, _ = run(capsys, "config", str(REPO / "configs" / "breastmnist_fixmatch.yaml"), "seed=3")
    cfg = config_from_dict(yaml.safe_load(out))
    assert (cfg.seed, cfg.method.name, cfg.data.dataset, cfg.train.steps) == (3, "fixmatch", "medmnist", 300)
    code, _, err = run(capsys, "config", "--defaults", "seed=3")
    assert code == 2 and "--defaults prints the defaults alone" in err


def test_config_of_a_search_space_is_its_base(capsys):
    import yaml

    code, out, _ = run(capsys, "config", str(REPO / "search_spaces" / "medmnist_ssl.yaml"))
    assert code == 0
    first, body = out.split("\n", 1)
    assert "is a search space" in first and "method.name=supervised" in first and "semimed sweep" in first
    values = yaml.safe_load(body)
    assert values["data"]["dataset"] == "medmnist" and values["train"]["steps"] == 200


def test_shipped_configs_and_search_spaces_carry_no_machine_paths():
    """A data.root is empty (given on the command line), a placeholder the demo fills in, or relative to the
    repository root and present there."""
    import yaml

    from semimed.config import config_from_dict

    roots = {}
    for path in sorted([*(REPO / "search_spaces").glob("*.yaml"), *(REPO / "configs").glob("*.yaml")]):
        values = yaml.safe_load(path.read_text())
        section = values.get("base", values)
        roots[path.name] = str(section.get("data", {}).get("root", ""))
        assert "/work/" not in path.read_text() and "/shared/" not in path.read_text(), path
        if "base" not in values:
            config_from_dict(values)  # a run config that `semimed train` accepts as is
    assert roots["breastmnist_fixmatch.yaml"] == "semimed/demo_data/breastmnist.npz"
    for name, root in roots.items():
        assert (
            root == "" or root.startswith("REPLACE") or (not root.startswith("/") and (REPO / root).exists())
        ), (
            name,
            root,
        )


def test_train_and_sweep_say_what_to_pass_without_data_root(tmp_path, capsys, monkeypatch):
    code, out, err = run(capsys, "train", str(REPO / "search_spaces" / "breakhis_ssl.yaml"), "--local")
    assert code == 2 and "is a search space" in out
    assert "data.root is not set; give it on the command line, data.root=PATH (breakhis: " in err
    code, _, err = run(
        capsys, "sweep", str(REPO / "search_spaces" / "chestxray14_ssl.yaml"), "--storage", str(tmp_path)
    )
    assert code == 2 and "data.root is not set" in err and "chestxray14: " in err
    assert not any(tmp_path.iterdir())  # refused before anything started
    monkeypatch.chdir(tmp_path)  # a relative data.root is relative to the repository root
    code, _, err = run(capsys, "train", str(REPO / "configs" / "breastmnist_fixmatch.yaml"))
    assert code == 2 and "data.root semimed/demo_data/breastmnist.npz: not found from" in err


def test_train_accepts_the_example_config_and_a_search_space_base(tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.chdir(REPO)
    fast = ["train.steps=4", "train.eval_every=2", "train.checkpoint_every=4", f"output_dir={tmp_path}"]
    fast += [f"data.cache_dir={tmp_path / 'cache'}"]
    code, out, _ = run(capsys, "train", "configs/breastmnist_fixmatch.yaml", *fast, "name=example")
    assert code == 0 and "test/roc_auc" in out
    saved = yaml.safe_load((tmp_path / "example" / "config.yaml").read_text())
    assert saved["data"]["root"] == str(REPO / "semimed" / "demo_data" / "breastmnist.npz")  # made absolute
    code, out, _ = run(
        capsys,
        "train",
        "search_spaces/medmnist_ssl.yaml",
        "--local",
        *fast,
        "name=base",
        "model.backbone=small_cnn",
    )
    assert code == 0 and "is a search space: semimed train uses its base config" in out
    assert yaml.safe_load((tmp_path / "base" / "config.yaml").read_text())["method"]["name"] == "supervised"


def test_split_prints_integer_counts_once(demo_roots, tmp_path, capsys):
    code, out, _ = run(
        capsys, "split", "breakhis", "--root", str(demo_roots["breakhis"]), "--out", str(tmp_path / "s.json")
    )
    table = out[out.index("images (patients) per class and split:") :].splitlines()[1:]
    assert code == 0 and ".0" not in "\n".join(table[:3])
    assert table[0].split()[-5:] == ["train", "val", "test", "labeled", "unlabeled"]
    split = json.loads((tmp_path / "s.json").read_text())
    benign = next(line.split() for line in table if line.split()[0] == "benign")
    assert benign[1] == str(sum("/benign/" in p for p in split["train"]))
