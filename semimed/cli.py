"""`semimed` entry point: parse, dispatch, nothing else. Bad input exits 2 with one line on stderr."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from semimed.errors import SemimedError


def _cmd_split(args: argparse.Namespace) -> None:
    from semimed.config import DataConfig
    from semimed.data import dataset_spec, load_dataset
    from semimed.data.splits import make_split, summarize

    data_cfg = DataConfig(
        dataset=args.dataset, root=args.root, task=args.task, options=_dataset_options(args)
    )
    dataset = load_dataset(data_cfg)
    split = make_split(
        dataset, args.fraction, args.seed, args.test_fraction, args.val_fraction, args.val_policy
    )
    import pandas as pd

    table = pd.DataFrame(summarize(split, dataset))
    # One column per split, each cell "images (patients)": counts as integers, no repeated block of columns.
    table["cell"] = [f"{int(i)} ({int(p)})" for i, p in zip(table["images"], table["patients"], strict=True)]
    wide = table.pivot(index="class", columns="split", values="cell")
    wide = wide.reindex(index=list(dataset.classes), columns=["train", "val", "test", "labeled", "unlabeled"])
    wide = wide.rename_axis(index="class", columns=None).reset_index()
    print(
        f"{dataset.name}/{dataset.task}: {len(dataset)} images, {len(set(dataset.patients))} patients; "
        f"seed {split.seed}, label fraction {split.fraction:g}, {split.protocol}"
    )
    print(f"split rule: {dataset_spec(args.dataset).split_rule}")
    print(f"patients per split: {split.patients}")
    print("images (patients) per class and split:")
    print(wide.to_string(index=False))
    for note in split.warnings:
        print(f"note: {note}")
    print(f"wrote {split.save(args.out)}")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from semimed.prepare import prepare

    result = prepare(
        args.dataset,
        args.root,
        args.size,
        args.out,
        task=args.task,
        workers=args.workers,
        rebuild=args.rebuild,
        download=args.download,
        **_dataset_options(args),
    )
    print("\n".join(result.lines))


# Dataset options become flags of `split` and `prepare` (`magnification` -> --magnification), generated from the
# registered specs' options dataclasses; the parsed value lands in args.<_OPTION_DEST><name>.
_OPTION_DEST = "dataset_option_"


def _add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """The dataset positional, --root, --task and one flag per dataset option, all from the registry."""
    import typing

    from semimed.data import DATASETS, dataset_spec

    specs = [dataset_spec(name) for name in DATASETS.names()]
    p.add_argument(
        "dataset",
        choices=[spec.name for spec in specs],
        help="; ".join(f"{spec.name}: {spec.description}" for spec in specs),
    )
    p.add_argument(
        "--root", required=True, help="; ".join(f"{spec.name}: {spec.root_help}" for spec in specs)
    )
    p.add_argument(
        "--task",
        default="",
        choices=_task_choices(),
        help="the dataset's task, * = its default (used when --task is not given): "
        + "; ".join(
            f"{spec.name}: {' | '.join(t + '*' * (t == spec.default_task) for t in spec.tasks)} "
            f"({spec.task_help})"
            for spec in specs
        ),
    )
    owners: dict[str, list] = {}
    for spec in specs:
        for item in spec.option_fields():
            owners.setdefault(item.name, []).append((spec, item))
    for name, pairs in owners.items():
        kind = typing.get_type_hints(pairs[0][0].options)[name]
        helps = "; ".join(
            f"{owner.name}: {field.metadata['help']}"
            + ("" if kind is bool else f" (default: {field.default})")
            for owner, field in pairs
        )
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, dest=_OPTION_DEST + name, action="store_true", default=None, help=helps)
            continue
        shared = {tuple(field.metadata.get("choices") or ()) for _, field in pairs}
        choices = next(iter(shared)) if len(shared) == 1 and next(iter(shared)) else None
        p.add_argument(flag, dest=_OPTION_DEST + name, type=kind, choices=choices, default=None, help=helps)


def _downloadable() -> list[str]:
    from semimed.data import DATASETS, dataset_spec

    return [name for name in DATASETS.names() if dataset_spec(name).fetch is not None]


def _dataset_options(args: argparse.Namespace) -> dict:
    """The dataset option flags given on the command line; one that the chosen dataset lacks is an error."""
    from semimed.data import dataset_spec

    spec = dataset_spec(args.dataset)
    own = {item.name for item in spec.option_fields()}
    given = {
        key.removeprefix(_OPTION_DEST): value
        for key, value in vars(args).items()
        if key.startswith(_OPTION_DEST) and value is not None
    }
    foreign = sorted(set(given) - own)
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        valid = ", ".join("--" + name.replace("_", "-") for name in sorted(own)) or "none"
        raise SemimedError(f"{flags}: not an option of dataset {spec.name!r} (its options: {valid})")
    return given


def _load_run_config(path: str | None, overrides: list[str], command: str):
    """A run config from a config YAML, or from a search space's `base` (said on stdout, with how to pick a
    cell and how to run the grid), plus overrides."""
    from semimed.config import apply_overrides, config_from_dict, load_config, load_yaml, parse_override

    raw = load_yaml(path) if path else {}
    if not {"base", "base_config", "grid"} & set(raw):
        return load_config(path, overrides)
    from semimed.tune import load_search_space

    space = load_search_space(path)
    cell = space.cells[0] if space.cells else {}
    example = " ".join(
        f"{k}.name={v['name']}" if isinstance(v, dict) and "name" in v else f"{k}={v}"
        for k, v in cell.items()
    )
    print(
        f"{path} is a search space: semimed {command} uses its base config; its grid "
        f"({', '.join(space.grid) or 'none'}) is not applied. One cell: add overrides"
        + (f", e.g. {example}" if example else "")
        + f"; the whole grid: semimed sweep {path}"
    )
    try:
        return config_from_dict(apply_overrides(space.base, dict(parse_override(o) for o in overrides)))
    except SemimedError as exc:
        raise SemimedError(f"{path}: {exc}") from None


def _require_root(cfg, where: str) -> None:
    """data.root must be given: search spaces and example configs carry no machine paths."""
    if cfg.data.root:
        return
    from semimed.data import dataset_spec

    spec = dataset_spec(cfg.data.dataset)
    raise SemimedError(
        f"{where}: data.root is not set; give it on the command line, data.root=PATH "
        f"({spec.name}: {spec.root_help})"
    )


def _resolved_root(root: str, where: str) -> str:
    """A relative data.root made absolute (against the current directory), so that it means the same file in
    Ray's trial and worker processes, which run in other directories; one that does not exist is an error."""
    path = Path(root).expanduser()
    if "://" in root or path.is_absolute():
        return str(path) if "://" not in root else root
    if not path.exists():
        raise SemimedError(
            f"{where}: data.root {root}: not found from {Path.cwd()} (relative paths in configs/ and "
            "search_spaces/ are relative to the repository root: run from there, or give data.root=/absolute/path)"
        )
    return str(path.resolve())


def _cmd_train(args: argparse.Namespace) -> None:
    import dataclasses

    from semimed.runs import RUN_FILE, default_run_name

    cfg = _load_run_config(args.config, args.overrides, "train")
    _require_root(cfg, args.config)
    root = _resolved_root(cfg.data.root, args.config)
    if root != cfg.data.root:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root))
    if not cfg.name:
        if args.resume:
            raise SemimedError(
                "--resume needs the run's name: pass name=RUN_NAME, or the run's own config "
                "(semimed train RUN_DIR/config.yaml --resume)"
            )
        cfg = dataclasses.replace(cfg, name=default_run_name(cfg))
    run_dir = Path(cfg.output_dir).expanduser() / cfg.name
    if args.resume and not (run_dir / RUN_FILE).is_file():
        raise SemimedError(f"{run_dir}: no run to resume (no {RUN_FILE})")
    print(f"run directory: {run_dir.resolve()}")
    if args.local:
        from semimed.experiment import run_training

        final = run_training(cfg, run_dir)
    else:
        from semimed.train import train_once

        final = train_once(cfg, args.address)
    _print_metrics(final)
    print(f"run directory: {run_dir.resolve()}")


def _print_metrics(final: dict) -> None:
    for key in sorted(final):
        if key.startswith("test/") and "/" not in key[5:]:
            print(
                f"{key:32s} {final[key]:.4f}" if isinstance(final[key], float) else f"{key:32s} {final[key]}"
            )


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
    for cell in space.cells or [{}]:
        _require_root(space.trial_config(cell), args.search_space)
    if not any(axis == "data" or axis.startswith("data.root") for axis in space.grid):
        from semimed.config import apply_overrides

        root = space.trial_config(space.cells[0] if space.cells else {}).data.root
        resolved = _resolved_root(root, args.search_space)
        if resolved != root:
            space = dataclasses.replace(space, base=apply_overrides(space.base, {"data.root": resolved}))
    from semimed import sweep_progress
    from semimed.train import init_ray
    from semimed.tune import run_sweep

    log_path = sweep_progress.sweep_log_path(experiment)
    print(f"{len(space.trials)} trial(s); experiment directory: {experiment}")
    if not args.verbose:
        print(f"Ray's own output (tables, logs, the trials' output): {log_path}  (-v prints it here)")
    with sweep_progress.quiet_output(log_path, args.verbose):
        init_ray(args.address)
        run_sweep(space, args.storage, resume=args.resume, cluster_config=args.cluster_config)
        import ray

        ray.shutdown()  # inside: Ray's exit messages go to the log too
    print(f"experiment directory: {experiment}")
    print(f"next: semimed report {experiment}    |    tensorboard --logdir {experiment}")


def _cmd_report(args: argparse.Namespace) -> None:
    import warnings

    from semimed.report import write_report

    # The report's own warnings (skipped trials, unusable predictions) become plain lines after the tables;
    # unfinished trials are listed in the markdown itself.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, text = write_report(args.experiment_dir)
    print(text)
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"warning: {message}", file=sys.stderr)
    from semimed.storage import join

    print(f"wrote {join(args.experiment_dir, 'report.csv')}, report.md, report.png, tb_report/ (TensorBoard)")
    print(f"curves and the study in TensorBoard: tensorboard --logdir {args.experiment_dir}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from semimed.demo_run import run_demo

    run_demo(
        Path(args.out),
        storage=args.storage,
        smoke=args.smoke_test,
        synthetic=args.synthetic,
        verbose=args.verbose,
    )


def _cmd_config(args: argparse.Namespace) -> None:
    import yaml

    from semimed import __version__
    from semimed.config import Config

    path, overrides = args.config, list(args.overrides)
    if path and "=" in path and not Path(path).exists():  # `semimed config train.steps=5`: no file, overrides
        path, overrides = None, [path, *overrides]
    if args.defaults and (path or overrides):
        raise SemimedError("config: --defaults prints the defaults alone; leave out CONFIG and the overrides")
    cfg = Config() if args.defaults else _load_run_config(path, overrides, "config")
    source = "defaults" if args.defaults or not path else path
    print(f"# semimed {__version__}: effective run config ({source}{' + overrides' if overrides else ''})")
    print("# every key and its meaning: semimed/config.py; override any as section.key=value")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())


def _cmd_predict(args: argparse.Namespace) -> None:
    from semimed.predict import predict

    result = predict(
        args.run_dir,
        images=args.images,
        root=args.root,
        out=args.out,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
    )
    print(
        f"wrote {result.output}: {result.images} image(s), classes {', '.join(result.classes)}, "
        f"device {result.device}"
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


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
        type=_positive_int,
        default=None,
        help="trials at once (overrides the search space's max_concurrent_trials; default: what the cluster "
        "fits, see --cluster-config; --dry-run prints the plan)",
    )
    p.add_argument(
        "--cluster-config",
        default=None,
        help="a `ray up` YAML or KubeRay RayCluster/RayJob manifest: default concurrency = what it fits at its "
        "largest (on a `ray up` head, ~/ray_bootstrap_config.yaml is read without this)",
    )


def _cmd_backbones(args: argparse.Namespace) -> None:
    from semimed.explain import GRADCAM_LAYERS
    from semimed.models.backbones import backbone_names, count_parameters, create_backbone

    # Counted as published (ImageNet-1k: 3 x 224 px, 1000-class head), so the numbers can be checked against
    # timm and the papers; a run's own head (K classes) and gray stem change them slightly.
    print(f"{'backbone':24s} {'parameters (ImageNet-1k head)':>30s}  Grad-CAM layer")
    for name in backbone_names():
        model = create_backbone(name, num_classes=1000, in_chans=3, image_size=224 if "vit" in name else None)
        print(f"{name:24s} {count_parameters(model):>30,}  {GRADCAM_LAYERS.get(name, '(last feature map)')}")


def _cmd_explain(args: argparse.Namespace) -> None:
    from semimed.explain import explain_run

    results = explain_run(args.run_dir, args.images, args.out, target=args.target, layer=args.layer)
    for item in results:
        print(
            f"{item.image}: predicted {item.prediction}; map for {item.target} (p={item.score:.3f}) -> {item.output}"
        )
    print(f"TensorBoard: tensorboard --logdir {Path(args.run_dir) / 'tb'}  (images tab, tag gradcam)")


def _task_choices() -> list[str]:
    from semimed.data import DATASETS, dataset_spec

    return sorted({task for name in DATASETS.names() for task in dataset_spec(name).tasks})


def build_parser() -> argparse.ArgumentParser:
    from semimed import __version__

    parser = argparse.ArgumentParser(
        prog="semimed",
        description="Few-label learning lab for medical images: patient-disjoint splits, nested label fractions, "
        "a matched supervised control, semi-supervised methods, Ray Train/Tune sweeps, reports with paired "
        "confidence intervals.",
        epilog="First steps: `semimed demo` (real BreastMNIST images, ~5 min on 2 cores), then "
        "`semimed config --defaults`, `semimed train configs/breastmnist_fixmatch.yaml --local`. "
        "`semimed COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"semimed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    p = sub.add_parser(
        "split", help="draw a patient-disjoint split with a labeled fraction; print and save it"
    )
    _add_dataset_arguments(p)
    p.add_argument(
        "--fraction", type=float, default=1.0, help="share of the training images that keep labels"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="split seed (the patient split and the labeled subset)"
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.3,
        help="of the patients, where the dataset has no official test set",
    )
    p.add_argument("--val-fraction", type=float, default=0.15, help="of the training patients")
    p.add_argument(
        "--val-policy",
        default="full",
        choices=["full", "fraction", "none"],
        help="full: every val image labeled; fraction: val labeled at --fraction; none: no val",
    )
    p.add_argument("--out", required=True, help="split JSON to write (data.split_file of a run)")
    p.set_defaults(func=_cmd_split)

    p = sub.add_parser(
        "prepare", help="decode every image once into the cache that runs with data.cache_dir read"
    )
    _add_dataset_arguments(p)
    p.add_argument("--size", type=int, required=True, help="side in pixels (= data.image_size of the runs)")
    p.add_argument("--out", required=True, help="cache directory (= data.cache_dir of the runs)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores, at most 8)")
    p.add_argument("--rebuild", action="store_true", help="decode again even if a complete cache exists")
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch --root if it does not exist (datasets with a download: "
        + (", ".join(_downloadable()) or "none")
        + ")",
    )
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser(
        "train",
        help="one training run (Ray Train; --local: in this process)",
        description="One training run into OUTPUT_DIR/NAME. Without `name`, a new folder "
        "<method>-<dataset>-<time>-<hash> is made; with a `name` whose folder holds the same run (same config, "
        "split and code), the run resumes there; a folder holding another run is refused, untouched.",
    )
    p.add_argument(
        "config",
        help="run config YAML (e.g. configs/breastmnist_fixmatch.yaml; keys and defaults: semimed config "
        "--defaults), or a search space, whose base config is used",
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a private local Ray)")
    p.add_argument("--local", action="store_true", help="run the engine directly, without Ray")
    p.add_argument(
        "--resume",
        action="store_true",
        help="the run folder must hold this run already (e.g. semimed train RUN_DIR/config.yaml --resume)",
    )
    p.set_defaults(func=_cmd_train)

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
    p.add_argument("--address", default=None, help="a Ray cluster (auto: the one this node belongs to)")
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

    p = sub.add_parser(
        "demo",
        help="a small label-fraction study on real images (packaged BreastMNIST) on a local Ray, with its report",
        description="Supervised control vs FixMatch and Mean Teacher on BreastMNIST (MedMNIST v2, CC BY 4.0; "
        "shipped with semimed, no download) at 3 label fractions x 3 seeds, then the report with paired "
        "verdicts. About 5 minutes on 2 CPU cores. The previous demo's experiment folder is replaced.",
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

    p = sub.add_parser("backbones", help="list the documented backbones with parameter counts")
    p.set_defaults(func=_cmd_backbones)

    p = sub.add_parser("explain", help="Grad-CAM heat-map overlays (PNG) for images under a trained run")
    p.add_argument("run_dir", help="a finished run folder (it holds config.yaml and backbone.safetensors)")
    p.add_argument(
        "--images", nargs="+", required=True, help="image files (any size; resized like evaluation)"
    )
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/gradcam)")
    p.add_argument("--target", default=None, help="class to explain (default: each image's top class)")
    p.add_argument(
        "--layer", default=None, help="module name of the layer (default: per backbone, see explain.py)"
    )
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser(
        "predict",
        help="class probabilities (CSV) for images or a whole dataset, with a trained run's reported model",
        description="Uses RUN_DIR/backbone.safetensors (the network the run's test metrics were reported "
        "for) and the run's preprocessing (decode, shorter side to data.image_size, centre crop, the run's "
        "normalization); batches on the GPU when there is one. Writes one row per image: score/<class> and the "
        "predicted class (multi-label: the findings above the run's val-chosen thresholds).",
    )
    p.add_argument("run_dir", help="a finished run folder (it holds config.yaml and backbone.safetensors)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--images", nargs="+", help="image files (any size; prepared like the run's evaluation)"
    )
    source.add_argument(
        "--root",
        help="a dataset root of the run's dataset type (its data.root kind): every image is predicted, with "
        "its patient and label columns",
    )
    p.add_argument("--out", default=None, help="CSV to write (default: RUN_DIR/predict.csv)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument(
        "--workers", type=int, default=0, help="image-decoding processes (0: decode in this process)"
    )
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "config",
        help="print the effective run config (YAML): the defaults, or a config / search space + overrides",
        description="semimed config --defaults: every key with its default. semimed config CONFIG [key=value …]: "
        "the config `semimed train` would run (a search space: its base). Save it and edit it to start a "
        "config of your own.",
    )
    p.add_argument(
        "config", nargs="?", default=None, help="run config or search-space YAML (omit: the defaults)"
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
    p.add_argument("--defaults", action="store_true", help="print the built-in defaults, nothing else")
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `key=value` overrides may follow the flags (`semimed train c.yaml --local train.steps=5`), which argparse's
    # positional `nargs="*"` does not take once an option came between.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        args.func(args)
    except SemimedError as exc:
        print(f"semimed: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
