"""Single-run commands: `train`, `config`, `explain`, `predict`, `evaluate` and `backbones`."""

from __future__ import annotations

import argparse
from pathlib import Path

from semimed.cli.common import positive_int, require_root, resolved_root
from semimed.errors import SemimedError


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


def _cmd_train(args: argparse.Namespace) -> None:
    import dataclasses

    from semimed import storage
    from semimed.files import check_output_dir
    from semimed.runs import RUN_FILE, check_name, default_run_name

    cfg = _load_run_config(args.config, args.overrides, "train")
    from semimed.experiment import check_config

    check_config(cfg)  # the whole config first: an error leaves no run folder behind (nothing is made yet)
    if args.address and (args.local or cfg.scaling.num_workers == 0):
        # Both train in this process without Ray: the cluster named would be ignored without a word.
        why = "--local" if args.local else "scaling.num_workers=0"
        raise SemimedError(
            f"--address {args.address}: {why} trains in this process, without Ray, so the cluster would not be "
            "used; set scaling.num_workers=1 (or more) to train there (without --local), or drop --address"
        )
    if cfg.name:
        check_name(cfg.name, "name")
    # Where the run goes is checked before any data is read: a file or a read-only folder there is one line now,
    # not an OSError after the data loaded (or, on storage, after a connection's retries).
    if storage.is_uri(cfg.output_dir):
        if args.local:
            raise SemimedError(
                f"output_dir {cfg.output_dir}: a storage URI, and --local writes a local folder; drop --local "
                "(scaling.num_workers=0 trains in this process and mirrors the run folder there) or give a path"
            )
        storage.check_location(cfg.output_dir, "output_dir")
    else:
        check_output_dir(cfg.output_dir, "output_dir")
    require_root(cfg, args.config)
    root = resolved_root(cfg.data.root, args.config)
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
    try:
        if args.local:
            from semimed.experiment import run_training

            final = run_training(cfg, run_dir)
        else:
            from semimed.train import train_once

            final = train_once(cfg, args.address)
    except KeyboardInterrupt:
        # Ctrl-C: semimed.cli.main says it in one line; add how to go on from the run's last checkpoint.
        if storage.is_uri(cfg.output_dir) or not (run_dir / RUN_FILE).is_file():
            raise
        import shlex

        again = ["semimed", "train", str((run_dir / "config.yaml").resolve()), "--resume"]
        again += ["--local"] if args.local else (["--address", args.address] if args.address else [])
        raise KeyboardInterrupt(f"resume: {shlex.join(again)}") from None
    _print_metrics(final)
    print(f"run directory: {run_dir.resolve()}")


def _print_metrics(final: dict) -> None:
    for key in sorted(final):
        if key.startswith("test/") and "/" not in key[5:]:
            print(
                f"{key:32s} {final[key]:.4f}" if isinstance(final[key], float) else f"{key:32s} {final[key]}"
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
    if not args.defaults:
        from semimed.experiment import check_config

        check_config(cfg)  # what `semimed train` checks first: a config printed here is one that would run
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


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from semimed.cli.data import _dataset_options
    from semimed.evaluate import evaluate_run, run_dataset

    dataset = args.dataset or run_dataset(args.run_dir)
    result = evaluate_run(
        args.run_dir,
        args.out,
        root=args.root,
        dataset=dataset,
        task=args.task,
        options=_dataset_options(args, dataset),
        part=args.split,
        split_file=args.split_file,
        n_boot=args.n_boot,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
    )
    print(
        f"{args.run_dir} (step {result.step}) on {dataset} at {args.root}: {result.images} image(s), "
        f"{result.patients} patient(s)"
        + (f", positive class {result.positive_class}" if result.positive_class else "")
    )
    for name, value in result.metrics.items():
        if "/" in name:
            continue  # per-class values: metrics.json
        low, high = result.intervals.get(name, (float("nan"), float("nan")))
        interval = f"  [{low:.4f}, {high:.4f}]" if low == low and high == high else ""
        print(f"{name:24s} {value:.4f}{interval}")
    print(f"wrote {result.out}: report.md, metrics.json, predictions.parquet")


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
    from semimed.explain import explain_run, tensorboard_dir

    results = explain_run(args.run_dir, args.images, args.out, target=args.target, layer=args.layer)
    for item in results:
        print(
            f"{item.image}: predicted {item.prediction}; map for {item.target} (p={item.score:.3f}) -> {item.output}"
        )
    print(
        f"TensorBoard: tensorboard --logdir {tensorboard_dir(args.run_dir, args.out)}  (images tab, tag gradcam)"
    )


def add_train(sub: argparse._SubParsersAction) -> None:
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


def add_backbones(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backbones", help="list the documented backbones with parameter counts")
    p.set_defaults(func=_cmd_backbones)


def add_explain(sub: argparse._SubParsersAction) -> None:
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


def add_predict(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument(
        "--workers", type=int, default=0, help="image-decoding processes (0: decode in this process)"
    )
    p.set_defaults(func=_cmd_predict)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    from semimed.cli.data import _task_choices, add_dataset_option_flags
    from semimed.data import DATASETS

    p = sub.add_parser(
        "evaluate",
        help="external validation: a trained run's metrics, with 95%% intervals, on another site's dataset",
        description="Scores RUN_DIR's reported network (as `semimed predict`) on every image of another "
        "dataset and reports the run's metrics (its positive class, its multi-label thresholds chosen on val) "
        "with 95%% patient-cluster bootstrap intervals. Writes predictions.parquet, metrics.json and report.md "
        "into --out; the run folder is never modified.",
    )
    p.add_argument(
        "run_dir", help="a finished run folder (it holds config.yaml, metrics.json, backbone.safetensors)"
    )
    p.add_argument("--root", required=True, help="the external dataset's root (its kind: --dataset)")
    p.add_argument(
        "--out",
        required=True,
        help="folder to write (not inside a run folder, nor beside run folders: semimed report would read it)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        choices=DATASETS.names(),
        help="the external data's kind (default: the run's data.dataset, with the run's task and options)",
    )
    p.add_argument(
        "--task", default="", choices=_task_choices(), help="the dataset's task (semimed split --help)"
    )
    add_dataset_option_flags(p)
    p.add_argument(
        "--split",
        default=None,
        choices=["all", "test"],
        help="all: every image (default); test: the dataset's official test part only",
    )
    p.add_argument(
        "--split-file", default=None, help="score the test part of this saved split (semimed split)"
    )
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap replicates")
    p.add_argument(
        "--seed", type=int, default=0, help="bootstrap seed (the same seed gives the same intervals)"
    )
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument(
        "--workers", type=int, default=0, help="image-decoding processes (0: decode in this process)"
    )
    p.set_defaults(func=_cmd_evaluate)


def add_config(sub: argparse._SubParsersAction) -> None:
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
