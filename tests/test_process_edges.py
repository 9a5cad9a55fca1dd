"""How a command starts, prints and ends: `python -m semimed`, progress bars off a terminal, library warnings,
explain's output folder, Ctrl-C, an unreachable Ray address, local Ray, trial resources, report notes and
optional packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- 1. python -m semimed


def test_python_dash_m_semimed_runs_the_cli(tmp_path):
    import semimed
    from semimed import __version__

    # The module must be in the package itself: an editable install's import finder may otherwise find
    # `semimed.__main__` in another checkout of the project.
    assert (Path(semimed.__file__).parent / "__main__.py").is_file()

    # cwd outside the repository: `-m` puts the current folder first on sys.path.
    done = subprocess.run(
        [sys.executable, "-m", "semimed", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"semimed {__version__}"


# ------------------------------------------------------------------------------ 2. no bars off a terminal


def test_training_progress_bar_is_not_drawn_into_a_non_tty_stream(capsys):
    from semimed.engine.log import Tensorboard, TrainLog
    from semimed.methods.base import StepOutput

    log = TrainLog(Tensorboard(None, False), steps=4, start_step=0, eval_every=4, show_progress=True)
    for done in range(1, 5):
        log.record(StepOutput(torch.tensor(0.5)), images=8)
        log.flush(done, lr=0.1)
    log.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "train:" not in err


# --------------------------------------------------------------------------- 3. warnings at the CLI boundary


def test_cli_says_semimed_warnings_once_in_one_line_and_filters_library_warnings(monkeypatch, capfd):
    import warnings

    import numpy as np

    from semimed.cli import main
    from semimed.metrics.core import roc_auc

    def command(args) -> None:
        for _ in range(3):  # an undefined metric at every evaluation: said once
            assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.7]), name="malignant"))
        warnings.warn("full_backward_hook is deprecated", UserWarning, stacklevel=1)  # like torch's own
        np.mean(np.array([]))  # numpy's own RuntimeWarning ("Mean of empty slice")
        print("done")

    monkeypatch.setattr("semimed.cli.runs._cmd_config", command)
    assert main(["config", "--defaults"]) == 0
    out, err = capfd.readouterr()
    assert out == "done\n"
    assert err == (
        "semimed: warning: ROC AUC is undefined for class 'malignant': y_true has only one class "
        "(2 pos, 0 neg)\n"
    )
    # The library itself still warns as before, for Python callers and tests.
    with pytest.warns(RuntimeWarning, match="ROC AUC is undefined"):
        roc_auc(np.array([1, 1]), np.array([0.2, 0.7]))


# ------------------------------------------------------- 3, 4. a tiny run: clean stderr; explain --out only


def test_tiny_train_and_explain_print_no_library_warnings_and_explain_writes_only_under_out(
    demo_roots, tmp_path, capfd
):
    from semimed.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(
        f"name: run\noutput_dir: {tmp_path}\ndata:\n  dataset: breakhis\n  root: {demo_roots['breakhis']}\n"
        f"  image_size: 16\n  cache_dir: {tmp_path / 'cache'}\nmodel:\n  backbone: small_cnn\n"
        "train:\n  steps: 2\n  eval_every: 2\n  batch_size: 8\n  device: cpu\n  loader_workers: 0\n"
    )
    assert main(["train", str(config), "--local"]) == 0
    _, err = capfd.readouterr()
    # Nothing but semimed's own one-line warnings (no "RuntimeWarning: ..." with its source line).
    assert all(line.startswith("semimed: warning: ") for line in err.splitlines()), err
    run_dir = tmp_path / "run"
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    image = sorted(demo_roots["breakhis"].rglob("*.png"))[0]
    out_dir = tmp_path / "explained"
    assert main(["explain", str(run_dir), "--images", str(image), "--out", str(out_dir)]) == 0
    out, err = capfd.readouterr()
    assert "Warning" not in err, err
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # the run folder is byte-identical: no new TensorBoard events in run/tb
    assert list((out_dir / "tb").glob("events.out.tfevents.*"))  # the overlays went under --out
    assert f"tensorboard --logdir {out_dir / 'tb'}" in out


# ---------------------------------------------------------------------------------------------- 5. Ctrl-C


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(monkeypatch, capfd):
    from semimed.cli import main

    def command(args) -> None:
        print("working")
        raise KeyboardInterrupt

    monkeypatch.setattr("semimed.cli.runs._cmd_config", command)
    try:
        code = main(["config", "--defaults"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped semimed.cli.main (a traceback for the user)")
    assert code == 130
    out, err = capfd.readouterr()
    assert out == "working\n"
    assert err == "semimed: interrupted\n"


def test_ctrl_c_says_how_to_resume_when_the_command_knows(monkeypatch, capfd):
    from semimed.cli import main

    def command(args) -> None:
        raise KeyboardInterrupt("resume: semimed train /runs/a/config.yaml --resume --local")

    monkeypatch.setattr("semimed.cli.runs._cmd_config", command)
    try:
        code = main(["config", "--defaults"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped semimed.cli.main (a traceback for the user)")
    assert code == 130
    assert capfd.readouterr().err == (
        "semimed: interrupted; resume: semimed train /runs/a/config.yaml --resume --local\n"
    )


class _Grid(list):
    """What `sweep_interrupted` reads of a Tune ResultGrid: its length and status counts."""

    def __init__(self, terminated: int, errors: int, total: int) -> None:
        super().__init__(range(total))
        self.num_terminated, self.num_errors = terminated, errors


def test_an_interrupted_sweep_is_told_from_a_finished_one():
    from semimed.tune.runner import SweepInterrupted, sweep_interrupted

    finished, with_errors = _Grid(4, 0, 4), _Grid(3, 1, 4)
    assert not sweep_interrupted(False, [finished, with_errors])
    # Tune took Ctrl-C and returned the partial results, like a finished sweep's, without an error:
    assert sweep_interrupted(False, [finished, _Grid(2, 0, 4)])  # trials left pending or running
    assert sweep_interrupted(True, [finished])  # a SIGINT arrived (between trials, at the very end)
    stop = SweepInterrupted("/results/study")
    assert isinstance(stop, KeyboardInterrupt) and stop.experiment == "/results/study"
    assert str(stop) == "Tune saved the sweep's state in /results/study"


def test_an_interrupted_sweep_exits_130_with_how_to_resume_and_no_footer(monkeypatch, tmp_path, capfd):
    import yaml

    import semimed.train
    import semimed.tune
    from semimed.cli import main
    from semimed.tune.runner import SweepInterrupted

    space = tmp_path / "space.yaml"
    base = {"data": {"dataset": "breakhis", "root": str(tmp_path)}, "train": {"steps": 10}}
    space.write_text(yaml.safe_dump({"name": "study", "base": base, "grid": {"seed": [0, 1]}}))
    storage = tmp_path / "results"

    def interrupted(space, storage, **kwargs):  # what run_sweep raises once Tune saved its state
        raise SweepInterrupted(f"{storage}/study")

    monkeypatch.setattr(semimed.train, "init_ray", lambda address=None: None)
    monkeypatch.setattr(semimed.tune, "run_sweep", interrupted)
    code = main(["sweep", str(space), "seed=0", "--storage", str(storage)])
    out, err = capfd.readouterr()
    assert code == 130
    assert err == (
        f"semimed: interrupted; Tune saved the sweep's state in {storage}/study; "
        f"resume: semimed sweep {space} seed=0 --storage {storage} --resume\n"
    )
    assert "next: semimed report" not in out


def test_sigint_watch_sees_a_sigint_that_another_handler_took():
    import signal

    from semimed.interrupts import SigintWatch

    taken = []
    previous = signal.getsignal(signal.SIGINT)
    with SigintWatch() as watch:
        assert not watch.seen()
        # Like Tune's and Ray Train's handlers: they take the signal and do not chain to the previous handler.
        signal.signal(signal.SIGINT, lambda signum, frame: taken.append(signum))
        signal.raise_signal(signal.SIGINT)
        assert taken == [signal.SIGINT] and watch.seen()
    assert watch.seen()
    assert signal.getsignal(signal.SIGINT) is previous  # the handler Tune left behind is gone again
    with SigintWatch() as quiet:
        pass
    assert not quiet.seen()


# ----------------------------------------------------------------------------- 6. an unreachable --address


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_address_where_nothing_listens_fails_in_one_line_before_ray_starts(monkeypatch):
    import ray

    from semimed.errors import SemimedError
    from semimed.train import init_ray

    def no_init(*args, **kwargs):
        raise AssertionError("ray.init was called: it retries an unreachable address for minutes")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_init)
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(SemimedError, match=f"--address {address}: no Ray cluster answers at {address}"):
        init_ray(address)


def test_the_address_probe_accepts_a_listening_port_and_names_a_bad_one():
    import socket

    from semimed.errors import SemimedError
    from semimed.train import check_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}")
        check_reachable(f"ray://127.0.0.1:{port}")
    check_reachable("auto")  # left to Ray
    with pytest.raises(SemimedError, match="--address head:port: expected HOST:PORT"):
        check_reachable("head:port")


# --------------------------------------------------------------------------------- 7. a private local Ray


def test_a_private_local_ray_pins_ray_state_api_to_itself_and_names_an_unused_cluster(
    monkeypatch, tmp_path, capsys
):
    import socket

    import ray

    from semimed import train

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(train, "_LOCAL_RAY", False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    with socket.socket() as head:  # a `ray start` head recorded on this machine, and answering
        head.bind(("127.0.0.1", 0))
        head.listen()
        recorded = f"127.0.0.1:{head.getsockname()[1]}"
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(recorded)
        train.init_ray()
    (kwargs,) = calls
    assert kwargs["address"] == "local"
    # Ray's State API inside this Ray asks this Ray's dashboard, not whichever GCS it finds on the machine.
    assert kwargs["runtime_env"]["env_vars"]["RAY_API_SERVER_ADDRESS"] == (
        f"http://127.0.0.1:{kwargs['dashboard_port']}"
    )
    assert capsys.readouterr().out == (
        f"note: a Ray cluster started with `ray start` answers at {recorded}; without --address semimed "
        f"starts a private local Ray (to use that cluster: --address {recorded})\n"
    )
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert train.unused_cluster_note() == (
        "note: RAY_ADDRESS=10.0.0.5:6379 is set, but without --address semimed starts a private local Ray; "
        "to run on that cluster: --address 10.0.0.5:6379"
    )
    monkeypatch.delenv("RAY_ADDRESS")
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_closed_port()}")  # stale record
    assert train.unused_cluster_note() is None


# --------------------------------------------------------------- 8. trial resources follow the method's needs


def test_closed_form_trials_ask_for_no_gpu_next_to_gpu_network_trials():
    from semimed.tune import describe_trials, load_cluster_config, load_search_space, make_plan

    space = load_search_space(REPO / "search_spaces" / "breakhis_label_fraction.yaml", ["data.root=/data"])
    lines = describe_trials(space)
    classical = [line for line in lines if "method classical" in line]
    supervised = [line for line in lines if "method supervised" in line]
    assert (len(classical), len(supervised)) == (54, 18)
    assert all("in-process (no Train workers) × 4 CPU;" in line for line in classical)
    assert all("1 Ray Train worker(s) × 4 CPU, 1 GPU;" in line for line in supervised)
    plan = make_plan(space, load_cluster_config(REPO / "cluster" / "aws.yaml"), local=False, from_config=True)
    assert "  and: in-process (no Train workers) {CPU: 4} (54 of 72 trials: classical)" in plan.lines()
    # What Tune reserves per trial: the trial process itself (a network's Train worker asks for its own GPU).
    from semimed.tune.plan import trial_resources

    reserve = trial_resources(space)
    cell = {"data.fraction": 0.1, "seed": 0}
    forest = {"name": "classical", "params": {"features": "glcm_lbp_color", "classifier": "random_forest"}}
    assert reserve({**cell, "method": forest}).bundles == [{"CPU": 4.0}]
    assert reserve({**cell, "method": {"name": "supervised"}}).bundles == [{"CPU": 0.5}]


# ---------------------------------------------------------------- 9. what the report's means are made of


def test_report_notes_mixed_code_versions_and_a_null_seed_metric(tmp_path, capsys):
    import json
    import warnings

    from test_report import rows, write_trial

    from semimed.cli import main
    from semimed.report import write_report

    code = {"semimed": "0.1.0", "git_commit": "a" * 40, "torch": "2.14.1"}
    for seed in range(3):
        run = write_trial(tmp_path, f"sup_{seed}", seed=seed)
        version = {**code, "git_commit": "b" * 40} if seed == 2 else code
        (run / "run.json").write_text(json.dumps({"code": version, "config": {}}))
    metrics_path = tmp_path / "runs" / "sup_1" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["test/roc_auc"] = None  # undefined for this seed (e.g. one class in its test set)
    metrics_path.write_text(json.dumps(metrics))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, text = write_report(tmp_path)
    assert rows(summary, metric="roc_auc")["n"].item() == 2  # sup_1 left out of the mean
    assert rows(summary, metric="accuracy")["n"].item() == 3
    versions = (
        "arm supervised averages trials of 2 code versions (git_commit aaaaaaaaaa vs bbbbbbbbbb): "
        "sup_0, sup_1 | sup_2"
    )
    null = (
        "trial sup_1 (arm supervised, fraction 0.1, seed 1): test/roc_auc null/NaN, left out of that mean "
        "(n = the seeds kept)"
    )
    assert f"- Note: {versions}.\n- Note: {null}." in text
    assert {f"semimed report: {versions}", f"semimed report: {null}"} <= {str(w.message) for w in caught}
    assert text == (tmp_path / "report.md").read_text()
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"warning: semimed report: {versions}" in err and f"warning: semimed report: {null}" in err


# ------------------------------------------------------------------------- 10. optional packages, the license


def test_license_and_extras_metadata():
    import tomllib

    import semimed

    repo = Path(semimed.__file__).resolve().parents[1]  # the checkout whose package is imported
    license_text = (repo / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n\nCopyright (c) 2026 the semimed developers\n")
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    assert (project["license"], project["license-files"]) == ("MIT", ["LICENSE"])
    dependencies = " ".join(project["dependencies"])
    for moved in ("grad-cam", "lightly", "scikit-image", "optuna"):
        assert moved not in dependencies
    assert "torch>=2.3" in project["dependencies"] and "torchvision>=0.18" in project["dependencies"]
    extras = project["optional-dependencies"]
    assert extras["gradcam"] == ["grad-cam>=1.5"] and extras["selfsup"] == ["lightly>=1.5"]
    assert extras["classical"] == ["scikit-image>=0.22"] and extras["optuna"] == ["optuna>=3.0"]
    assert extras["all"][0].startswith("semimed[gradcam,selfsup,classical,optuna,")
    assert 'pip install -e ".[dev,all]"' in (repo / "Makefile").read_text()
    assert "CC BY 4.0" in (repo / "semimed" / "demo_data" / "README.md").read_text()  # BreastMNIST's credit


def test_a_missing_optional_package_is_one_line_naming_its_extra(monkeypatch, tmp_path, capsys):
    import sys

    import yaml

    from semimed.cli import main
    from semimed.errors import SemimedError
    from semimed.methods import create_method
    from semimed.models.backbones import create_backbone
    from semimed.tune import load_search_space

    for module in ("pytorch_grad_cam", "lightly", "skimage", "optuna"):
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails: not installed
    with pytest.raises(
        SemimedError,
        match=r"^method simclr needs the optional package lightly: pip install 'semimed\[selfsup\]'$",
    ):
        create_method("simclr", create_backbone("small_cnn", 2, 1), 2, False)
    with pytest.raises(SemimedError, match=r"package scikit-image: pip install 'semimed\[classical\]'$"):
        create_method("classical", None, 2, False, features="glcm_lbp_color")
    space = tmp_path / "space.yaml"
    base = {"data": {"dataset": "breakhis", "root": "/data"}, "train": {"steps": 10}}
    space.write_text(
        yaml.safe_dump(
            {
                "name": "o",
                "base": base,
                "sample": {"train.lr": {"loguniform": [1e-4, 1e-2]}},
                "search": {"algorithm": "optuna"},
            }
        )
    )
    with pytest.raises(
        SemimedError, match=r"optuna needs the optional package optuna: pip install 'semimed\[optuna\]'"
    ):
        load_search_space(space)
    from semimed.explain import gradcam

    model = create_backbone("small_cnn", 2, 1)
    with pytest.raises(
        SemimedError, match=r"^Grad-CAM \(semimed explain\) needs the optional package grad-cam"
    ):
        gradcam(model, torch.zeros(1, 1, 16, 16), backbone="small_cnn")
    # Through the CLI: the one line, exit 2.
    monkeypatch.setattr(
        "semimed.cli.runs._cmd_config", lambda args: gradcam(model, torch.zeros(1, 1, 16, 16))
    )
    assert main(["config", "--defaults"]) == 2
    assert capsys.readouterr().err == (
        "semimed: error: Grad-CAM (semimed explain) needs the optional package grad-cam: "
        "pip install 'semimed[gradcam]'\n"
    )
