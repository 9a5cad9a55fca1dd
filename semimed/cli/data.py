"""Data commands: `split` and `prepare`, and their dataset flags, generated from the dataset registry."""

from __future__ import annotations

import argparse

from semimed.errors import SemimedError


def _cmd_split(args: argparse.Namespace) -> None:
    from semimed.config import DataConfig
    from semimed.data import dataset_spec, load_dataset
    from semimed.data.splits import make_split, summarize

    _check_split_out(args.out)
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


def _check_split_out(out: str) -> None:
    """--out must be a file semimed can write, and not a run's own split.json (the split it was trained on)."""
    from semimed.files import check_output_file
    from semimed.runs import run_owning

    owner = run_owning(out)
    if owner is not None:
        raise SemimedError(f"split: --out {out}: one of the files of the run {owner}, left as they are")
    check_output_file(out, "split: --out")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from semimed.files import check_output_dir
    from semimed.prepare import prepare

    check_output_dir(args.out, "prepare: --out")
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
    add_dataset_option_flags(p)


def add_dataset_option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per dataset option of every registered dataset (`split`, `prepare`, `evaluate`)."""
    import typing

    from semimed.data import DATASETS, dataset_spec

    specs = [dataset_spec(name) for name in DATASETS.names()]
    owners: dict[str, list] = {}
    for spec in specs:
        for item in spec.option_fields():
            owners.setdefault(item.name, []).append((spec, item))
    for name, pairs in owners.items():
        kind = typing.get_type_hints(pairs[0][0].options)[name]
        # A list[str] option's flag takes one string, "A,B": semimed.config splits it at commas.
        listed = typing.get_origin(kind) is list
        helps = "; ".join(
            f"{owner.name}: {field.metadata['help']}"
            + ("" if kind is bool else f" (default: {field.default_factory() if listed else field.default})")
            for owner, field in pairs
        )
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, dest=_OPTION_DEST + name, action="store_true", default=None, help=helps)
            continue
        shared = {tuple(field.metadata.get("choices") or ()) for _, field in pairs}
        choices = next(iter(shared)) if len(shared) == 1 and next(iter(shared)) else None
        p.add_argument(
            flag,
            dest=_OPTION_DEST + name,
            type=str if listed else kind,
            choices=choices,
            default=None,
            help=helps,
        )


def _downloadable() -> list[str]:
    from semimed.data import DATASETS, dataset_spec

    return [name for name in DATASETS.names() if dataset_spec(name).fetch is not None]


def _dataset_options(args: argparse.Namespace, dataset: str | None = None) -> dict:
    """The dataset option flags given on the command line; one that the chosen dataset (`dataset`, else
    args.dataset) lacks is an error."""
    from semimed.data import dataset_spec

    spec = dataset_spec(dataset or args.dataset)
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


def _task_choices() -> list[str]:
    from semimed.data import DATASETS, dataset_spec

    return sorted({task for name in DATASETS.names() for task in dataset_spec(name).tasks})


def add_split(sub: argparse._SubParsersAction) -> None:
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


def add_prepare(sub: argparse._SubParsersAction) -> None:
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
