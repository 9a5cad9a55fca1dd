"""Search-space YAML: validation with clear errors, grid expansion, sampled hyperparameters, resources and
`semimed sweep --dry-run` (no Ray runtime needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from semimed.cli import main
from semimed.errors import SemimedError
from semimed.tune import describe_trials, load_search_space, trial_label

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


BASE = {"data": {"dataset": "breakhis", "root": "/data/breakhis"}, "train": {"steps": 10}}


def test_grid_expands_to_the_full_factorial_and_resources_map_to_scaling(tmp_path):
    space = load_search_space(
        write(
            tmp_path,
            {
                "name": "s",
                "base": BASE,
                "grid": {
                    "method.name": ["supervised", "fixmatch"],
                    "data.fraction": [0.05, 0.1, 1.0],
                    "seed": [0, 1, 2],
                },
                "trial_resources": {
                    "num_workers": 2,
                    "use_gpu": True,
                    "gpus_per_worker": 0.25,
                    "cpus_per_worker": 2,
                },
            },
        )
    )
    assert len(space.trials) == 18
    assert {(t["method.name"], t["data.fraction"], t["seed"]) for t in space.trials} == {
        (m, f, s) for m in ("supervised", "fixmatch") for f in (0.05, 0.1, 1.0) for s in (0, 1, 2)
    }
    cfg = space.trial_config(space.trials[5])
    assert (cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.scaling.gpus_per_worker) == (2, True, 0.25)
    line = describe_trials(space)[0]
    assert "2 Ray Train worker(s) × 2 CPU, 0.25 GPU" in line and "10 steps" in line
    assert trial_label({"method.name": "fixmatch", "data.fraction": 0.05}) == "method=fixmatch,fraction=0.05"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"name": "s", "base": BASE, "grid": {"seed": [0]}, "gird": {}}, r"unknown key\(s\) gird"),
        (
            {"name": "s", "base": BASE, "grid": {"train.stesp": [1, 2]}},
            r"unknown config key 'train.stesp'.*'steps'",
        ),
        (
            {"name": "s", "base": BASE, "grid": {"seed": 0}},
            "'grid' must map dotted config keys to non-empty lists",
        ),
        (
            {"name": "s", "base": BASE, "grid": {"seed": [0]}, "sample": {"train.lr": {"logunif": [1, 2]}}},
            r"sample.train.lr must be one of",
        ),
        (
            {"name": "s", "base": BASE, "grid": {"seed": [0]}, "search": {"algorithm": "bayes"}},
            "unknown search.algorithm 'bayes'; valid: random, optuna, hyperopt",
        ),
        (
            {"name": "s", "base": BASE, "grid": {"seed": [0]}, "scheduler": {"name": "pbt"}},
            "unknown scheduler.name 'pbt'; valid: fifo, asha",
        ),
        (
            {"name": "s", "base": BASE, "grid": {"seed": [0]}, "trial_resources": {"gpus": 1}},
            r"unknown trial_resources key\(s\) gpus",
        ),
        (
            {
                "name": "s",
                "base": {**BASE, "method": {"name": "fixmatch"}},
                "grid": {"method.name": ["supervised", "fixmach"]},
            },
            "unknown method 'fixmach'",
        ),
    ],
)
def test_typos_fail_at_load_naming_the_file_and_key(tmp_path, values, message):
    with pytest.raises(SemimedError, match=message) as info:
        load_search_space(write(tmp_path, values))
    assert str(tmp_path / "space.yaml") in str(info.value)
    assert "\n" not in str(info.value)


def test_sampled_hyperparameters_and_outer_grid(tmp_path):
    space = load_search_space(
        write(
            tmp_path,
            {
                "name": "s",
                "base": BASE,
                "grid": {"data.fraction": [0.1, 1.0]},
                "sample": {
                    "train.lr": {"loguniform": [1e-4, 1e-2]},
                    "train.batch_size": {"choice": [[16, 32]]},
                },
                "num_samples": 3,
                "search": {"algorithm": "optuna", "metric": "val/roc_auc", "mode": "max"},
            },
        )
    )
    assert len(space.cells) == 2 and len(space.trials) == 6
    sampled = space.sampled_space()
    assert set(sampled) == {"train.lr", "train.batch_size"}
    assert sampled["train.batch_size"].categories == [16, 32]
    assert (sampled["train.lr"].lower, sampled["train.lr"].upper) == (1e-4, 1e-2)
    assert "train.lr~loguniform[0.0001, 0.01]" in describe_trials(space)[0]


def test_every_shipped_search_space_loads():
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        space = load_search_space(path)
        assert space.trials, path


def test_cli_dry_run_prints_trials_and_resources(tmp_path, capsys):
    path = write(
        tmp_path, {"name": "dry", "base": BASE, "grid": {"data.fraction": [0.1, 0.5], "seed": [0, 1]}}
    )
    assert main(["sweep", str(path), "--dry-run", "--storage", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert f"4 trial(s) of dry -> {tmp_path / 'results' / 'dry'}" in out
    assert out.count("1 Ray Train worker(s) × 1 CPU") == 4
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def test_cli_sweep_with_a_typo_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, {"name": "t", "base": {**BASE, "trian": {}}, "grid": {"seed": [0]}})
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("semimed: error: ") and "unknown config key 'trian'" in err and "\n" not in err


# The shape of search_spaces/breakhis_ssl.yaml: `method` is an axis of whole method entries (name + params).
SSL_GRID = {
    "method": [
        {"name": "supervised"},
        {"name": "pseudo_label", "params": {"threshold": 0.95, "lambda_u": 1.0, "rampup_steps": 1000}},
        {"name": "fixmatch", "params": {"threshold": 0.95, "lambda_u": 1.0}},
        {"name": "mean_teacher", "params": {"ema_decay": 0.99, "lambda_u": 10.0, "rampup_steps": 1000}},
        {"name": "gan_ssl", "params": {"image_size": 64, "lambda_u": 1.0}},
    ],
    "data.fraction": [0.01, 0.05, 0.1, 0.25, 0.5, 1.0],
    "seed": [0, 1, 2],
}
METHODS = ["supervised", "pseudo_label", "fixmatch", "mean_teacher", "gan_ssl"]


def test_override_of_a_grid_axis_replaces_the_axis(tmp_path, capsys):
    """`semimed sweep breakhis_ssl.yaml data.fraction=0.5` ran all 90 cells: the grid axis overrode the base."""
    path = write(tmp_path, {"name": "ssl", "base": BASE, "grid": SSL_GRID})
    space = load_search_space(path, ["data.fraction=0.5"])
    assert [(t["method"]["name"], t["data.fraction"], t["seed"]) for t in space.trials] == [
        (m, 0.5, s) for m in METHODS for s in (0, 1, 2)
    ]
    configs = [space.trial_config(t) for t in space.trials]
    assert {c.data.fraction for c in configs} == {0.5}
    assert [c.method.name for c in configs] == [m for m in METHODS for _ in range(3)]
    assert configs[6].method.params == {"threshold": 0.95, "lambda_u": 1.0}  # the grid's own entries are kept
    note = (
        "override data.fraction=0.5 replaces grid axis data.fraction [0.01, 0.05, 0.1, 0.25, 0.5, 1] -> [0.5]"
    )
    assert space.override_notes == (note,)

    assert main(["sweep", str(path), "data.fraction=0.5", "train.lr=0.01", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [note, "override train.lr=0.01 sets the base config of every trial", out[2]]
    assert out[2].startswith("15 trial(s) of ssl -> ") and len(out) == 3 + 15 + 4
    assert out[3 + 15].startswith("plan: 15 trial(s), at most ")  # then the plan (semimed/tune/plan.py)


def test_override_inside_whole_section_grid_values_is_set_in_each(tmp_path, capsys):
    """`method.params.threshold=0.5` was dropped: each grid `method` entry replaced the base's method section."""
    grid = {"method": SSL_GRID["method"][1:3], "seed": [0, 1]}
    path = write(tmp_path, {"name": "ssl", "base": BASE, "grid": grid})
    space = load_search_space(path, ["method.params.threshold=0.5"])
    assert [(t["method"]["name"], t["seed"]) for t in space.trials] == [
        ("pseudo_label", 0),
        ("pseudo_label", 1),
        ("fixmatch", 0),
        ("fixmatch", 1),
    ]
    params = [space.trial_config(t).method.params for t in space.trials]
    assert (
        params
        == [{"threshold": 0.5, "lambda_u": 1.0, "rampup_steps": 1000}] * 2
        + [{"threshold": 0.5, "lambda_u": 1.0}] * 2
    )
    assert space.override_notes == (
        "override method.params.threshold=0.5 is set in every value of grid axis method [pseudo_label, fixmatch]",
    )
    assert SSL_GRID["method"][1]["params"]["threshold"] == 0.95  # the caller's grid is not modified

    # The same for `train.lr` under a grid axis of whole `train` sections.
    trains = [{"steps": 10}, {"steps": 20, "lr": 0.1}]
    path = write(tmp_path, {"name": "t", "base": BASE, "grid": {"train": trains}})
    space = load_search_space(path, ["train.lr=0.003"])
    assert [(c.train.steps, c.train.lr) for c in map(space.trial_config, space.trials)] == [
        (10, 0.003),
        (20, 0.003),
    ]
    assert main(["sweep", str(path), "train.lr=0.003", "--dry-run"]) == 0
    assert "override train.lr=0.003 is set in every value of grid axis train" in capsys.readouterr().out


def test_override_that_breaks_some_grid_values_is_an_error_naming_them(tmp_path):
    path = write(tmp_path, {"name": "ssl", "base": BASE, "grid": SSL_GRID})
    with pytest.raises(SemimedError) as info:
        load_search_space(path, ["method.params.threshold=0.5"])
    message = str(info.value)
    assert message == (
        f"{path}: override method.params.threshold=0.5 is set in every value of grid axis method and makes "
        "supervised, mean_teacher, gan_ssl invalid (unknown parameter(s) threshold for method 'supervised'; "
        "valid: none); to change only some entries, edit them under grid: method in the search space and "
        "leave the override out"
    )


@pytest.mark.parametrize("override", ["train.lr=0.01", "train={lr: 0.01}"])
def test_override_of_a_sampled_key_is_an_error(tmp_path, override):
    values = {
        "name": "s",
        "base": BASE,
        "grid": {"seed": [0]},
        "sample": {"train.lr": {"loguniform": [1e-4, 1e-2]}},
    }
    with pytest.raises(
        SemimedError, match=r"train.lr is sampled \(loguniform\[0.0001, 0.01\]\) and an override"
    ):
        load_search_space(write(tmp_path, values), [override])


def test_override_holding_a_grid_axis_replaces_the_axis_it_sets(tmp_path):
    grid = {"method.name": ["supervised", "fixmatch"], "train.lr": [0.1, 0.01]}
    space = load_search_space(
        write(tmp_path, {"name": "s", "base": BASE, "grid": grid}),
        ["method={name: fixmatch, params: {threshold: 0.7}}"],
    )
    assert [(c.method.name, c.method.params, c.train.lr) for c in map(space.trial_config, space.trials)] == [
        ("fixmatch", {"threshold": 0.7}, 0.1),
        ("fixmatch", {"threshold": 0.7}, 0.01),
    ]
    assert space.override_notes[0].endswith(
        "replaces grid axis method.name [supervised, fixmatch] -> [fixmatch]"
    )


def test_override_of_the_base_that_breaks_a_trial_names_the_override(tmp_path):
    grid = {"method.name": ["supervised", "fixmatch"]}
    path = write(tmp_path, {"name": "s", "base": BASE, "grid": grid})
    assert load_search_space(
        path, ["method.name=fixmatch", "method.params.threshold=0.5"]
    ).override_notes == (
        "override method.name=fixmatch replaces grid axis method.name [supervised, fixmatch] -> [fixmatch]",
        "override method.params.threshold=0.5 sets the base config of every trial",
    )
    with pytest.raises(SemimedError) as info:
        load_search_space(path, ["method.params.threshold=0.5"])
    assert str(info.value) == (
        f"{path}: with override(s) method.params.threshold=0.5, trial method=supervised: "
        "unknown parameter(s) threshold for method 'supervised'; valid: none"
    )


# ---------------------------------------------------------------------------------------------------------
# searchers, schedulers and the metric they read: checked at load, before Ray starts


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"search": {"algorithm": "optuna", "metric": "test/roc_auc"}},
            "search.metric test/roc_auc: hyperparameters chosen on the test set make its numbers optimistic; "
            "use val/roc_auc",
        ),
        ({"scheduler": {"name": "asha"}, "search": {"metric": "val/rocauc"}}, "'val/rocauc' is not reported"),
        (
            {"scheduler": {"name": "asha", "grace": 5}},
            r"unknown scheduler option\(s\) grace; valid: grace_period",
        ),
        ({"scheduler": {"name": "asha", "grace_period": 0}}, "scheduler.grace_period must be a number > 0"),
        ({"scheduler": {"name": "fifo", "max_t": 5}}, r"scheduler fifo takes no options \(max_t\)"),
        ({"search": {"algorithm": "optuna", "mode": "maximize"}}, "search.mode must be max or min"),
        ({"max_concurrent_trials": 0}, "max_concurrent_trials must be a whole number >= 1, not 0"),
        (
            {"scheduler": {"name": "asha"}, "base": {**BASE, "data": {**BASE["data"], "val_policy": "none"}}},
            "search.metric val/roc_auc needs a validation set, but data.val_policy is none",
        ),
    ],
)
def test_search_and_scheduler_mistakes_fail_at_load(tmp_path, extra, message):
    with pytest.raises(SemimedError, match=message) as info:
        load_search_space(write(tmp_path, {"name": "s", "base": BASE, "grid": {"seed": [0]}, **extra}))
    assert "\n" not in str(info.value)


def test_hyperopt_without_its_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "hyperopt" else real(name, *a)
    )
    path = write(
        tmp_path,
        {"name": "h", "base": BASE, "grid": {"seed": [0]}, "search": {"algorithm": "hyperopt"}},
    )
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"semimed: error: {path}: search.algorithm hyperopt needs the optional package hyperopt: "
        "pip install 'semimed[hyperopt]'\n"
    )


def test_flag_overrides_the_yaml_concurrency_and_the_plan_says_why(tmp_path, capsys):
    path = write(
        tmp_path,
        {"name": "c", "base": BASE, "grid": {"seed": [0, 1, 2, 3, 4]}, "max_concurrent_trials": 1},
    )
    assert main(["sweep", str(path), "--dry-run", "--max-concurrent-trials", "3"]) == 0
    out = capsys.readouterr().out
    assert "plan: 5 trial(s), at most 3 at a time (max_concurrent_trials)" in out
    assert "3 at a time: {CPU: 4.5}" in out  # 3 × (1 worker × 1 CPU + 0.5 CPU for the trial itself)
    with pytest.raises(SystemExit) as exit_info:  # argparse: a usage error
        main(["sweep", str(path), "--dry-run", "--max-concurrent-trials", "0"])
    assert exit_info.value.code == 2
    assert "--max-concurrent-trials: must be >= 1, not 0" in capsys.readouterr().err


def test_trials_are_placed_node_by_node_not_by_summing_the_cluster():
    """Four 2-CPU nodes hold 8 CPUs, but not one 3-CPU worker: no trial fits (a sum would say 2)."""
    from semimed.tune import Cluster, TrialShape
    from semimed.tune.plan import NodeType, fits

    small = Cluster("four small nodes", (NodeType("n", {"CPU": 2.0}, 4),))
    assert fits(TrialShape(1, {"CPU": 3.0}, {"CPU": 0.5}), small, limit=10) == 0
    assert fits(TrialShape(1, {"CPU": 1.5}, {"CPU": 0.5}), small, limit=10) == 4  # one per node, exactly full
    # GPU nodes: the GPU limits (2 workers of 0.5 GPU per node), the drivers go where CPUs are left.
    gpus = Cluster("gpu", (NodeType("head", {"CPU": 0.0}, 1), NodeType("g", {"CPU": 8.0, "GPU": 1.0}, 3)))
    assert fits(TrialShape(1, {"CPU": 2.0, "GPU": 0.5}, {"CPU": 0.5}), gpus, limit=100) == 6
    assert (
        fits(TrialShape(1, {"CPU": 2.0, "GPU": 0.5}, {"CPU": 0.5}), gpus, limit=4) == 4
    )  # never more than asked


def test_dry_run_with_a_cluster_config_caps_at_the_trials_and_refuses_what_never_fits(tmp_path, capsys):
    cluster = REPO / "cluster" / "aws.yaml"
    gpu = {**BASE, "scaling": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 4}}
    path = write(tmp_path, {"name": "g", "base": gpu, "grid": {"seed": [0, 1, 2]}})
    assert main(["sweep", str(path), "--dry-run", "--cluster-config", str(cluster)]) == 0
    assert "plan: 3 trial(s), at most 3 at a time (all of them fit " in capsys.readouterr().out
    huge = {**BASE, "scaling": {"num_workers": 1, "use_gpu": True, "gpus_per_worker": 2}}
    path = write(tmp_path, {"name": "g", "base": huge, "grid": {"seed": [0]}})
    assert main(["sweep", str(path), "--dry-run", "--cluster-config", str(cluster)]) == 0
    assert "plan: 1 trial(s), none can run on " in capsys.readouterr().out
