"""Study commands: `sweep`, `submit`, `jobs`, `report` and `demo` (Ray Tune sweeps, Ray jobs, reports)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from semimed.cli.common import positive_int, require_root, resolved_root
from semimed.errors import SemimedError


def _cmd_sweep(args: argparse.Namespace) -> None:
    import dataclasses

    from semimed.tune import describe_trials, experiment_dir, load_search_space

    space = load_search_space(args.search_space, args.overrides)
    if args.max_concurrent_trials:
        space = dataclasses.replace(space, max_concurrent_trials=args.max_concurrent_trials)
    experiment = experiment_dir(space, args.storage)
    # Where each command-line override went (the rules: semimed/tune/__init__.py).
    for note in space.override_notes:
        print(note)
    if args.dry_run:
        from semimed.tune import load_cluster_config, make_plan, this_machine

        print(f"{len(space.trials)} trial(s) of {space.name} -> {experiment}")
        print("\n".join(describe_trials(space)))
        if args.cluster_config:
            plan = make_plan(space, load_cluster_config(args.cluster_config), local=False, from_config=True)
        else:
            plan = make_plan(space, this_machine(), local=args.address is None)
        print("\n".join(plan.lines()))
        return
    _check_storage(args.storage)
    if args.resume:  # before anything is made: a resume of nothing must not leave a new experiment folder
        from semimed.tune import check_resumable

        check_resumable(space, args.storage)
    for cell in space.cells or [{}]:
        require_root(space.trial_config(cell), args.search_space)
    if not any(axis == "data" or axis.startswith("data.root") for axis in space.grid):
        from semimed.config import apply_overrides

        root = space.trial_config(space.cells[0] if space.cells else {}).data.root
        resolved = resolved_root(root, args.search_space)
        if resolved != root:
            space = dataclasses.replace(space, base=apply_overrides(space.base, {"data.root": resolved}))
    import ray

    from semimed import sweep_progress
    from semimed.train import init_ray
    from semimed.tune import SweepInterrupted, resolve_storage, run_sweep

    log_path = sweep_progress.sweep_log_path(experiment)
    print(f"{len(space.trials)} trial(s); experiment directory: {experiment}")
    if not args.verbose:
        print(f"Ray's own output (tables, logs, the trials' output): {log_path}  (-v prints it here)")
    try:
        with sweep_progress.quiet_output(log_path, args.verbose):
            try:
                init_ray(args.address)
                run_sweep(space, args.storage, resume=args.resume, cluster_config=args.cluster_config)
            finally:
                ray.shutdown()  # inside: Ray's exit messages go to the log too
    except SweepInterrupted as exc:
        import shlex

        again = [
            "semimed",
            "sweep",
            args.search_space,
            *args.overrides,
            "--storage",
            resolve_storage(args.storage),
        ]
        again += ["--address", args.address] if args.address else []
        again += ["--cluster-config", args.cluster_config] if args.cluster_config else []
        again += (
            ["--max-concurrent-trials", str(args.max_concurrent_trials)] if args.max_concurrent_trials else []
        )
        # ONE line (semimed.cli.main prints "semimed: interrupted; <this>"), and no footer: the sweep is not done.
        raise KeyboardInterrupt(f"{exc}; resume: {shlex.join([*again, '--resume'])}") from None
    print(f"experiment directory: {experiment}")
    print(f"next: semimed report {experiment}    |    tensorboard --logdir {experiment}")


def _check_storage(given: str | None) -> None:
    """The results root (--storage, else $SEMIMED_STORAGE, else the default) can be written: checked before Ray
    starts, so that a file, a read-only folder or an unreachable s3:// server is one line, at once."""
    import os

    from semimed import storage
    from semimed.tune import resolve_storage

    key = "--storage" if given else ("$SEMIMED_STORAGE" if os.environ.get("SEMIMED_STORAGE") else "storage")
    storage.check_location(resolve_storage(given), key)


def _cmd_report(args: argparse.Namespace) -> None:
    import os
    import warnings

    from semimed import storage
    from semimed.errors import SemimedWarning
    from semimed.report import write_report

    if storage.is_uri(args.experiment_dir) or os.path.lexists(args.experiment_dir):  # missing: said below
        storage.check_location(args.experiment_dir, "report: experiment folder")
    # The report's own warnings (skipped trials, unusable predictions) become plain lines after the tables;
    # unfinished trials are listed in the markdown itself.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")  # other libraries' warnings: filtered, as for every command
        warnings.simplefilter("always", SemimedWarning)
        _, text = write_report(args.experiment_dir)
    print(text)
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"warning: {message}", file=sys.stderr)
    from semimed.storage import join

    print(f"wrote {join(args.experiment_dir, 'report.csv')}, report.md, report.png, tb_report/ (TensorBoard)")
    print(f"curves and the study in TensorBoard: tensorboard --logdir {args.experiment_dir}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from semimed import storage
    from semimed.demo_run import run_demo
    from semimed.files import check_output_dir

    check_output_dir(args.out, "demo: --out")
    if args.storage and storage.is_uri(args.storage):
        raise SemimedError(
            f"demo: --storage {args.storage}: the demo writes a local results folder; give a path (or use "
            "semimed sweep search_spaces/demo.yaml --storage URI)"
        )
    if args.storage:
        check_output_dir(args.storage, "demo: --storage")
    run_demo(
        Path(args.out),
        storage=args.storage,
        smoke=args.smoke_test,
        synthetic=args.synthetic,
        verbose=args.verbose,
    )


def _cmd_submit(args: argparse.Namespace) -> None:
    from semimed.jobs import submit

    concurrency = args.max_concurrent_trials
    if args.cluster_config and not concurrency:  # planned here, from the config the user has at hand
        from semimed.tune import load_cluster_config, load_search_space, make_plan

        space = load_search_space(args.search_space, args.overrides)
        plan = make_plan(space, load_cluster_config(args.cluster_config), local=False, from_config=True)
        print("\n".join(plan.lines()))
        concurrency = plan.concurrency
    job_id, status = submit(
        args.search_space,
        args.overrides,
        args.address,
        args.storage,
        args.token_path,
        wait=not args.no_wait,
        max_concurrent_trials=concurrency,
        resume=args.resume,
    )
    if status not in ("SUCCEEDED", "SUBMITTED", "RUNNING"):
        raise SemimedError(f"the sweep job {job_id} ended {status}")


def _cmd_jobs(args: argparse.Namespace) -> None:
    from semimed import jobs

    if args.action == "list":
        print("\n".join(jobs.list_jobs(args.address, args.token_path)))
        return
    if not args.job_id:
        raise SemimedError(f"semimed jobs {args.action} needs a job id (semimed jobs list shows them)")
    if args.action == "logs":
        jobs.job_logs(args.address, args.job_id, args.token_path, follow_logs=args.follow)
    else:
        print(f"job {args.job_id}: {jobs.stop_job(args.address, args.job_id, args.token_path)}")


def _add_job_client_arguments(p: argparse.ArgumentParser) -> None:
    import os

    address = os.environ.get("RAY_API_SERVER_ADDRESS")
    p.add_argument(
        "--address",
        default=address,
        required=address is None,
        help="dashboard address through your tunnel, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS)",
    )
    p.add_argument(
        "--token-path",
        default=None,
        help="Ray auth token file (default: RAY_AUTH_TOKEN[_PATH], ~/.ray/auth_token)",
    )


def _add_concurrency_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-concurrent-trials",
        type=positive_int,
        default=None,
        help="trials at once (overrides the search space's max_concurrent_trials; default: what the cluster "
        "fits, see --cluster-config; `semimed sweep ... --dry-run` prints the plan)",
    )
    p.add_argument(
        "--cluster-config",
        default=None,
        help="a `ray up` YAML or KubeRay RayCluster/RayJob manifest: default concurrency = what it fits at its "
        "largest (on a `ray up` head, ~/ray_bootstrap_config.yaml is read without this)",
    )


def add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="a Ray Tune sweep over a search-space YAML",
        description="Runs every trial of a search space (grid x samples x seeds) on Ray Tune. Prints one line "
        "per trial start and finish and a progress bar; Ray's own tables and logs go to "
        "<experiment>/sweep.log (-v: to the terminal). Then: semimed report <experiment>.",
    )
    p.add_argument(
        "search_space", help="search-space YAML (search_spaces/*.yaml; its format: semimed/tune/__init__.py)"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides: a grid axis's key replaces the axis by that value; a key inside "
        "whole-section grid values (method.params.threshold under `method`) is set in each of them; a sampled "
        "key is an error; any other key sets the base config. The sweep prints where each one went",
    )
    p.add_argument(
        "--address",
        default=None,
        help="a Ray cluster's address, e.g. HEAD_IP:6379 or auto (the cluster this node belongs to); default: a "
        "private local Ray",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="results root: a local or NFS path, or a pyarrow.fs URI (s3://bucket/prefix, gs://…); "
        "default $SEMIMED_STORAGE or ~/semimed_results",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the experiment of this name in --storage: unfinished and errored trials run again "
        "(from their checkpoints), finished ones are kept",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="Ray's tables and logs on the terminal, not in sweep.log"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print where the overrides went, the trials, their resources and the concurrency plan; run nothing",
    )
    _add_concurrency_arguments(p)
    p.set_defaults(func=_cmd_sweep)


def add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="submit a sweep to a Ray cluster (Ray Job API), follow its log, print the job id",
        description="Uploads the current directory (no data, results or .venv) and runs `semimed sweep` on the "
        "cluster's head. Follows the log until the job ends (Ctrl-C stops following, not the job).",
    )
    p.add_argument("search_space", help="path relative to the current directory, which is uploaded")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for semimed sweep")
    _add_job_client_arguments(p)
    p.add_argument(
        "--storage", default=None, help="results root visible to every node (NFS path, s3://…, gs://…)"
    )
    _add_concurrency_arguments(p)
    p.add_argument(
        "--resume", action="store_true", help="resume the experiment (finished trials are not run again)"
    )
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.set_defaults(func=_cmd_submit)


def add_jobs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "jobs", help="list the cluster's jobs, show or follow one's log, stop one (Ray Job API)"
    )
    p.add_argument(
        "action",
        choices=["list", "logs", "stop"],
        help="list: the cluster's jobs; logs: one job's log; stop: stop one job",
    )
    p.add_argument("job_id", nargs="?", default=None, help="the id `semimed submit` printed (logs, stop)")
    _add_job_client_arguments(p)
    p.add_argument("--follow", "-f", action="store_true", help="logs: follow until the job ends")
    p.set_defaults(func=_cmd_jobs)


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="tables, plot and TensorBoard summaries of test metrics vs label fraction",
        description="Reads <experiment>/runs/*/ (no Ray) and writes report.md, report.csv, report.png and "
        "tb_report/ (TensorBoard: metric vs label fraction per arm, x = fraction x 1000; HParams per trial).",
    )
    p.add_argument(
        "experiment_dir", help="the experiment folder a sweep printed (<storage>/<search-space name>)"
    )
    p.set_defaults(func=_cmd_report)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="a small label-fraction study on real images (packaged BreastMNIST) on a local Ray, with its report",
        description="Supervised control vs FixMatch and Mean Teacher on BreastMNIST (MedMNIST v2, CC BY 4.0; "
        "shipped with semimed, no download) at 3 label fractions x 3 seeds, then the report with paired "
        "verdicts. About 2 minutes on 2 idle CPU cores (longer on a busy machine). The previous demo's "
        "experiment folder is replaced.",
    )
    p.add_argument("--out", default="semimed_demo", help="folder for the demo's data cache and results")
    p.add_argument("--storage", default=None, help="results root (default: <out>/results)")
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help="a tiny version (4 short trials, one seed) that checks the whole path in about a minute",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="the synthetic BreakHis-format demo instead (cartoon histology in the real folder layout)",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="Ray's tables and logs on the terminal, not in sweep.log"
    )
    p.set_defaults(func=_cmd_demo)
