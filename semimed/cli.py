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
    wide = table.pivot_table(index="class", columns="split", values=["patients", "images"], sort=False)
    wide = wide.reindex(columns=["train", "val", "test", "labeled", "unlabeled"], level=1)
    print(
        f"{dataset.name}/{dataset.task}: {len(dataset)} images, {len(set(dataset.patients))} patients; "
        f"seed {split.seed}, label fraction {split.fraction:g}, {split.protocol}"
    )
    print(f"split rule: {dataset_spec(args.dataset).split_rule}")
    print(f"patients per split: {split.patients}")
    print(wide.to_string())
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


def _cmd_train(args: argparse.Namespace) -> None:
    import dataclasses

    from semimed.config import load_config
    from semimed.runs import RUN_FILE, default_run_name

    cfg = load_config(args.config, args.overrides)
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
    from semimed.tune import describe_trials, load_search_space, resolve_storage

    space = load_search_space(args.search_space, args.overrides)
    experiment = f"{resolve_storage(args.storage).rstrip('/')}/{space.name}"
    for note in space.override_notes:  # where each command-line override went (rules: semimed/tune.py)
        print(note)
    if args.dry_run:
        print(f"{len(space.trials)} trial(s) of {space.name} -> {experiment}")
        print("\n".join(describe_trials(space)))
        return
    from semimed.train import init_ray
    from semimed.tune import run_sweep

    print(f"{len(space.trials)} trial(s); experiment directory: {experiment}")
    init_ray(args.address)
    run_sweep(space, args.storage, resume=args.resume)
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
    print(f"wrote {Path(args.experiment_dir) / 'report.csv'}, report.md, report.png")


def _cmd_demo(args: argparse.Namespace) -> None:
    from semimed.demo_run import run_demo

    run_demo(Path(args.out), storage=args.storage, smoke=args.smoke_test)


def _cmd_submit(args: argparse.Namespace) -> None:
    from semimed.jobs import submit

    _, status = submit(
        args.search_space, args.overrides, args.address, args.storage, args.token_path, wait=not args.no_wait
    )
    if status not in ("SUCCEEDED", "SUBMITTED"):
        raise SemimedError(f"the sweep job ended {status}")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semimed", description="Few-label learning lab for medical images")
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("config", help="run config YAML (keys and defaults: semimed/config.py)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a private local Ray)")
    p.add_argument("--local", action="store_true", help="run the engine directly, without Ray")
    p.add_argument(
        "--resume",
        action="store_true",
        help="the run folder must hold this run already (e.g. semimed train RUN_DIR/config.yaml --resume)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sweep", help="a Ray Tune sweep over a search-space YAML")
    p.add_argument("search_space")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides: a grid axis's key replaces the axis by that value; a key inside "
        "whole-section grid values (method.params.threshold under `method`) is set in each of them; a sampled "
        "key is an error; any other key sets the base config. The sweep prints where each one went",
    )
    p.add_argument("--address", default=None)
    p.add_argument("--storage", default=None, help="results root (local path, NFS path or s3://…)")
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print where the overrides went, the trials and their resources; run nothing",
    )
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("submit", help="submit a sweep to a Ray cluster (Ray Job API) and follow it")
    p.add_argument("search_space", help="path relative to the current directory, which is uploaded")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base config")
    p.add_argument("--address", required=True, help="dashboard address, e.g. http://127.0.0.1:8265")
    p.add_argument("--storage", default=None, help="results root visible to every node (NFS path, s3://…)")
    p.add_argument(
        "--token-path",
        default=None,
        help="Ray auth token file (default: RAY_AUTH_TOKEN[_PATH], ~/.ray/auth_token)",
    )
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("report", help="tables and plot of test metrics vs label fraction")
    p.add_argument("experiment_dir")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", help="synthetic data -> small sweep on local Ray -> report")
    p.add_argument("--out", default="semimed_demo")
    p.add_argument("--storage", default=None, help="results root (default: <out>/results)")
    p.add_argument("--smoke-test", action="store_true", help="a tiny version that finishes in about a minute")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("backbones", help="list the documented backbones with parameter counts")
    p.set_defaults(func=_cmd_backbones)

    p = sub.add_parser("explain", help="Grad-CAM heat-map overlays (PNG) for images under a trained run")
    p.add_argument("run_dir")
    p.add_argument(
        "--images", nargs="+", required=True, help="image files (any size; resized like evaluation)"
    )
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/gradcam)")
    p.add_argument("--target", default=None, help="class to explain (default: each image's top class)")
    p.add_argument(
        "--layer", default=None, help="module name of the layer (default: per backbone, see explain.py)"
    )
    p.set_defaults(func=_cmd_explain)
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
