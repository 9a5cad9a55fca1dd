"""Self-supervised pretraining as a cached stage of a run (`pretrain.method: simclr | byol`).

A run with `pretrain.method` set starts its backbone from a self-supervised run of that method on its split's
TRAINING images (labels never read: the method has no labeled stream; val and test never shown: it classifies
nothing). That pretraining is itself an ordinary semimed run, kept under `<cache>/pretrain/<method>-<hash>/`
and keyed by its run fingerprint: dataset, training patients, seed, backbone, image size, recipe and code
version — not the label fraction, since a fraction only changes which training images keep their labels. So
in a fraction × seed sweep the first trial of a seed pretrains and every other fraction of that seed reuses it
(concurrent trials wait for it; put `seed` last in a grid so concurrent trials are different seeds).

Pretraining on another dataset's images (cross-domain) is the same thing one step removed: run the
self-supervised method on that dataset (`semimed train … method.name=simclr`) and start from it with
`model.pretrained_checkpoint=RUN_DIR`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from semimed.config import Config, PretrainConfig
from semimed.data.base import LabeledImageSet
from semimed.data.cache import default_cache_dir
from semimed.models.checkpoints import BACKBONE_FILE
from semimed.runs import RUN_FILE, RunIdentity, RunLockedError, run_identity

WAIT_POLL_S = 2.0


def pretraining_config(cfg: Config) -> Config:
    """The self-supervised run that `cfg.pretrain` asks for: same data, backbone and seed; the recipe's method,
    budget and optimizer; no selection (nothing is evaluated) and no label fraction of its own."""
    pre: PretrainConfig = cfg.pretrain
    return dataclasses.replace(
        cfg,
        name="",
        data=dataclasses.replace(cfg.data, fraction=1.0, val_policy="full"),
        model=dataclasses.replace(cfg.model, pretrained=False, pretrained_checkpoint=""),
        method=dataclasses.replace(cfg.method, name=pre.method, params=dict(pre.params)),
        train=dataclasses.replace(
            cfg.train,
            steps=pre.steps,
            batch_size=pre.batch_size,
            lr=pre.lr,
            unlabeled_ratio=1,
            ema=0.0,
            eval_every=pre.steps,
            checkpoint_every=min(cfg.train.checkpoint_every, pre.steps),
            select_metric="",
        ),
        pretrain=PretrainConfig(),
    )


def pretraining_folder(cfg: Config, identity: RunIdentity) -> Path:
    root = Path(cfg.data.cache_dir or default_cache_dir()).expanduser()
    return root / "pretrain" / f"{cfg.pretrain.method}-{cfg.model.backbone}-{identity.fingerprint[:16]}"


def pretrained_backbone(cfg: Config, dataset: LabeledImageSet, show_progress: bool = True) -> Path:
    """The folder of the finished pretraining `cfg.pretrain` asks for; runs it first when it is not cached
    (or waits while another process runs it)."""
    from semimed.experiment import load_split, run_training  # the pretraining is an ordinary run

    pre = pretraining_config(cfg)
    identity = run_identity(pre, load_split(pre, dataset), dataset)
    folder = pretraining_folder(cfg, identity)
    announced = False
    while not _finished(folder, identity):
        try:
            run_training(pre, folder, show_progress=show_progress)
        except RunLockedError:
            if not announced:  # another trial of this seed is pretraining it: wait, then reuse it
                print(f"semimed: waiting for the pretraining in {folder}", file=sys.stderr)
                announced = True
            time.sleep(WAIT_POLL_S)
    return folder


def _finished(folder: Path, identity: RunIdentity) -> bool:
    record = folder / RUN_FILE
    return (
        (folder / "metrics.json").is_file()
        and (folder / BACKBONE_FILE).is_file()
        and record.is_file()
        and RunIdentity.load(record).fingerprint == identity.fingerprint
    )
