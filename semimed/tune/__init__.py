"""Ray Tune adapter: a search-space YAML -> Tuner(s) whose trials each build and fit a TorchTrainer.

Search-space YAML (unknown keys are errors; see search_spaces/ for complete examples):

    name: breakhis_ssl                    # experiment name -> <storage>/<name>
    base: {data: {...}, train: {...}}     # a semimed config (or `base_config: path/to/config.yaml`)
    grid:                                 # full factorial over dotted config keys: every cell is run
      method.name: [supervised, fixmatch]
      data.fraction: [0.01, 0.05, 0.1]
      seed: [0, 1, 2]
    sample:                               # optional sampled hyperparameters, num_samples per grid cell
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      method.params.threshold: {uniform: [0.8, 0.98]}
    num_samples: 1
    search: {algorithm: random, metric: val/roc_auc, mode: max}   # random | optuna | hyperopt
    scheduler: {name: fifo}                # fifo (default) | asha (grace_period, reduction_factor, max_t: steps)
    trial_resources: {num_workers: 1, cpus_per_worker: 1, use_gpu: false, gpus_per_worker: 1}
    max_concurrent_trials: 2               # optional; default: semimed/tune/plan.py (`--dry-run` prints it)
    max_failures: 1                        # Tune retries of a failed trial (it resumes from its checkpoint)

FIFO is the default because a fraction × seed study must run every cell to the same budget: early stopping
would bias the small-fraction means. Optuna and HyperOpt reject grid axes, so with them each grid cell is
its own search (the outer-grid pattern): one Tuner per cell, all in the same experiment directory. Optuna
and HyperOpt are optional extras (`pip install 'semimed[optuna]'`, `'semimed[hyperopt]'`). A searcher other than random, or ASHA, reads
`search.metric` from every result: `val/<metric>` (the latest evaluation; a result at a checkpoint without
an evaluation repeats it) or `train/loss`; never `test/*`. ASHA counts in steps: a trial is judged first at
`grace_period` steps (default: train.eval_every) and stopped when it is below the best 1/reduction_factor of
the trials judged there before it; its folder then has no metrics.json (`semimed report` lists it unfinished).

Storage (`--storage`, $SEMIMED_STORAGE, default ~/semimed_results): a local or NFS path, or a URI that
pyarrow.fs opens (s3://, gs://). Each trial's files live in `<storage>/<name>/runs/<trial>/` (run.json, config,
split, TensorBoard, metrics.json, predictions.parquet, backbone.safetensors); on a URI they are written in a
local staging folder and mirrored there at each checkpoint and at the end (semimed/storage.py). Checkpoints:
the run folder's `checkpoints/` on a path; on a URI, Ray's copies (`<name>/<Tune trial>/checkpoint_*` for
in-process trials, `<name>/train/train-<trial id>/checkpoint_*` for Ray Train trials). Tune's state and
result logs (CSV, JSON; not its TensorBoard logger: semimed/sweep_progress.py) live under `<storage>/<name>/`
too, so `tensorboard --logdir <storage>/<name>` shows each curve once.

Command-line overrides (`semimed sweep SPACE key=value ...`) are never dropped silently. Each one lands in
exactly one place, and `--dry-run` and the start of a real sweep print where:

- a key that IS a grid axis replaces that axis by the one value:
  `override data.fraction=0.5 replaces grid axis data.fraction [0.01, 0.05, 0.1, 0.25, 0.5, 1] -> [0.5]`;
- a key INSIDE a whole-section grid axis (`method.params.threshold` under the axis `method`, whose values are
  entries like `{name: fixmatch, params: {threshold: 0.95}}`; `train.lr` under an axis `train`) is set in
  every value of that axis. If that makes some value invalid (supervised takes no `threshold`), loading
  fails, naming the override and those values: to change only some entries, edit them under `grid:` in the
  search space instead;
- a key that holds grid axes (`method={name: fixmatch}` over the axis `method.name`) sets that section of the
  base; an axis whose key the override's value sets is replaced by that value, the others keep varying;
- a sampled key (equal to a `sample:` key, inside one or containing one) is an error: the samples are what
  the search explores, and pinning one from the command line would quietly turn num_samples trials into
  copies. Move it to `base` (or make it a grid axis) in the search space;
- any other key sets the base config of every trial.

Modules: `space` (YAML -> validated SearchSpace), `overrides` (where overrides go), `plan` (resources and
concurrency), `trial` (the trial function), `runner` (Tuners, run, resume, errored trials). A trial that failed
after its retries is marked errored and the others run to the end; `run_sweep` lists the errored ones and
raises only when every trial failed.
"""

from semimed.tune.overrides import trial_label
from semimed.tune.plan import (
    TRIAL_CPU,
    Cluster,
    Plan,
    TrialShape,
    describe_trials,
    load_cluster_config,
    make_plan,
    plan_for_run,
    this_machine,
    trial_shape,
)
from semimed.tune.runner import (
    DEFAULT_STORAGE,
    SweepInterrupted,
    build_tuners,
    check_resumable,
    default_concurrency,
    errored_trials,
    experiment_dir,
    resolve_storage,
    run_sweep,
)
from semimed.tune.space import (
    ALGORITHMS,
    DISTRIBUTIONS,
    SCHEDULERS,
    SEARCH_SPACE_KEYS,
    TRIAL_RESOURCE_KEYS,
    SearchSpace,
    load_search_space,
)
from semimed.tune.trial import TrialProcessKilled

__all__ = [
    "ALGORITHMS",
    "DEFAULT_STORAGE",
    "DISTRIBUTIONS",
    "SCHEDULERS",
    "SEARCH_SPACE_KEYS",
    "TRIAL_CPU",
    "TRIAL_RESOURCE_KEYS",
    "Cluster",
    "Plan",
    "SearchSpace",
    "SweepInterrupted",
    "TrialProcessKilled",
    "TrialShape",
    "build_tuners",
    "check_resumable",
    "default_concurrency",
    "describe_trials",
    "errored_trials",
    "experiment_dir",
    "load_cluster_config",
    "load_search_space",
    "make_plan",
    "plan_for_run",
    "resolve_storage",
    "run_sweep",
    "this_machine",
    "trial_label",
    "trial_shape",
]
