"""What a sweep prints: one line when a trial starts, one when it ends (its cell, its test metric, its time),
one progress bar with an ETA; everything else Ray says goes to a log file in the experiment folder.

Three parts, each through a public seam of Ray Tune:

- `TrialLines`, a `ray.tune.Callback`: Tune calls it when a trial starts, reports, finishes, errors or is
  retried; it prints the lines and drives the bar (tqdm on a terminal; on a pipe or file, where a bar would
  be one endless line, each finish line carries `[k/N, ETA m:ss]` instead).
- `run_config_options`: the `ray.tune.RunConfig` arguments of a sweep: `verbose=0` (no per-trial result
  tables), the callbacks above, and Tune's CSV and JSON result loggers WITHOUT its TensorBoard logger. Tune's
  TBXLoggerCallback would write a second copy of every curve the engine already writes to
  `runs/<trial>/tb/` (tags `ray/tune/...`), and its start line "To visualize your results with TensorBoard,
  run: tensorboard --logdir <Ray's staging folder>" points at the wrong folder. Tune adds its three default
  loggers unless `TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1`; then it adds none, so the two kept are passed here.
- `quiet_output`: for the duration of a sweep, file descriptors 1 and 2 of this process (and Python's
  sys.stdout and sys.stderr) point at `<experiment>/sweep.log`. That is where Tune's experiment tables, Ray's driver and core logs and the
  trials' own output (which Ray forwards to the driver's stdout/stderr) land, whatever library or language
  wrote them. The lines above go to the terminal through a duplicate of the original stdout. On an error the
  last lines of the log are shown with its path. `verbose=True` (`-v`) leaves the terminal alone: Ray prints
  its tables and logs as usual.

The callback finds where to print when it prints (the active `quiet_output`, else sys.stdout): Tune pickles
a sweep's RunConfig, callbacks included, into the experiment folder (`Tuner.restore`), so the callback holds
no stream.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ray import tune

LOG_FILE = "sweep.log"
TAIL_ON_ERROR = 25  # log lines shown when a sweep fails


@dataclass
class _Output:
    console: IO[str]  # the terminal (a duplicate of the original stdout)
    log_path: Path | None  # where everything else goes; None when verbose


_ACTIVE: list[_Output] = []


def console() -> IO[str]:
    """Where user-facing lines go now: the terminal of the active `quiet_output`, else sys.stdout."""
    return _ACTIVE[-1].console if _ACTIVE else sys.stdout


def say(line: str = "") -> None:
    """Print one user-facing line (above the progress bar, if one is drawn)."""
    stream = console()
    bar = _BAR.get("bar")
    if bar is not None:
        bar.write(line, file=stream)
    else:
        print(line, file=stream, flush=True)


_BAR: dict[str, Any] = {}  # the one live tqdm bar, if any (so that `say` writes above it)


def sweep_log_path(experiment: str) -> Path:
    """`<experiment>/sweep.log` for a local experiment; for one on object storage (s3://…, gs://…) a local
    file in the temporary folder, named after the experiment."""
    if "://" in experiment:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment.rstrip("/").rsplit("/", 1)[-1])
        return Path(os.environ.get("TMPDIR", "/tmp")) / f"semimed-{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    return Path(experiment) / LOG_FILE


@contextlib.contextmanager
def quiet_output(log_path: Path, verbose: bool = False) -> Iterator[IO[str]]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to `log_path`; yield the terminal.

    Lines printed with `say` (and the progress bar) reach the terminal. If the block raises (other than
    KeyboardInterrupt), the log's last TAIL_ON_ERROR lines and its path are printed to stderr after the terminal
    is restored."""
    if verbose:
        _ACTIVE.append(_Output(sys.stdout, None))
        try:
            yield sys.stdout
        finally:
            _ACTIVE.pop()
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    log = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed below)
    failed = False
    streams = sys.stdout, sys.stderr
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        # Python-level writers too, for when sys.stdout is not file descriptor 1 (a notebook, a test harness).
        sys.stdout = sys.stderr = log
        _ACTIVE.append(_Output(terminal, log_path))
        yield terminal
    except KeyboardInterrupt:
        raise  # Ctrl-C is not a failure to explain: the CLI says it in one line
    except BaseException:
        failed = True
        raise
    finally:
        close_bar()  # an interrupted or failed sweep leaves its bar open
        _ACTIVE.pop()
        sys.stdout, sys.stderr = streams
        for stream in (*streams, log):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log.close()
        terminal.flush()
        terminal.close()
        if failed:
            tail = log_path.read_text(errors="replace").splitlines()[-TAIL_ON_ERROR:]
            print(f"--- last {len(tail)} lines of {log_path} ---", file=sys.stderr)
            print("\n".join(tail), file=sys.stderr)
            print("---", file=sys.stderr, flush=True)


def trial_lines(space, concurrency: int) -> TrialLines:
    """The progress callback of a sweep over `space` (a semimed.tune.SearchSpace)."""
    return TrialLines(list(space.grid) + list(space.sample), len(space.trials), space.metric, concurrency)


def is_verbose() -> bool:
    """Whether Ray's own tables should print: inside `quiet_output(..., verbose=True)`, or outside any
    `quiet_output` (a sweep started from Python, e.g. a test or a script, keeps Ray's usual output)."""
    return not _ACTIVE or _ACTIVE[-1].log_path is None


def run_config_options(callback: TrialLines | None) -> dict[str, Any]:
    """Keyword arguments for `ray.tune.RunConfig`: verbosity, the callbacks, no TensorBoard logger."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    # Read by Tune when the Tuner runs (ray/tune/utils/callback.py, _create_default_callbacks): without it Tune
    # would add its TBXLoggerCallback (a second copy of every curve, see the module docstring).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    callbacks: list[tune.Callback] = [CSVLoggerCallback(), JsonLoggerCallback()]
    if callback is not None:
        callbacks.append(callback)
    return {"callbacks": callbacks, **({} if is_verbose() else {"verbose": 0})}


def _minutes(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


def first_error_line(error: BaseException | None) -> str:
    """`Type: first line` of a trial's error: its own exception, not Ray's `ray::ImplicitFunc.train()` frame."""
    if error is None:
        return "unknown error (see the log)"
    cause = getattr(error, "cause", None)
    if cause is not None:
        error = cause
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class TrialLines(tune.Callback):
    """One line per trial start and finish, one progress bar over all `total` trials of a sweep.

    `keys`: the config keys that tell trials apart (grid axes, sampled keys); `metric`: the metric named at a
    trial's end, `test/<name>` from its final report (`val/<name>` of its last evaluation if it has none).
    One instance serves every Tuner of a sweep (Optuna/HyperOpt run one per grid cell), so the count and the
    ETA are over the whole sweep.
    """

    def __init__(self, keys: list[str], total: int, metric: str = "roc_auc", concurrency: int = 1) -> None:
        self.keys, self.total, self.metric, self.concurrency = list(keys), int(total), metric, concurrency
        self._reset()

    def _reset(self) -> None:
        self.started: dict[str, float] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.done = self.errored = 0
        self.durations: list[float] = []
        self.t0: float | None = None
        self.counted_resumed = False

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles RunConfig: keep the settings, not the progress
        return {
            "keys": self.keys,
            "total": self.total,
            "metric": self.metric,
            "concurrency": self.concurrency,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    # -------------------------------------------------------------------------------------------- labels

    def cell(self, trial) -> str:
        from semimed.tune import trial_label

        config = trial.config or {}
        label = trial_label({k: config[k] for k in self.keys if k in config})
        return label.replace(",", " ") or trial.trial_id

    def _metric_text(self, trial) -> str:
        result = self.results.get(trial.trial_id) or trial.last_result or {}
        name = self.metric.split("/", 1)[-1]
        for prefix in ("test", "val"):
            value = result.get(f"{prefix}/{name}")
            if isinstance(value, (int, float)):
                return f"{prefix} {name} {value:.3f}"
        return f"no {name} reported"

    # ----------------------------------------------------------------------------------------- progress

    def _bar(self):
        if "bar" in _BAR:
            return _BAR["bar"]
        stream = console()
        bar = None
        if hasattr(stream, "isatty") and stream.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.total,
                initial=self.done,
                desc="trials",
                unit="trial",
                file=stream,
                dynamic_ncols=True,
                bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed} elapsed, ETA {remaining}{postfix}",
            )
        _BAR["bar"] = bar
        return bar

    def _eta(self) -> str:
        """Remaining trials × mean trial time / trials run at a time (after the first trial finishes)."""
        if not self.durations:
            return "ETA –"
        remaining = max(0, self.total - self.done - self.errored)
        mean = sum(self.durations) / len(self.durations)
        return f"ETA {_minutes(remaining * mean / max(1, self.concurrency))}"

    def _advance(self) -> str:
        bar = self._bar()
        if bar is not None:
            bar.update(1)
            return ""
        return f"  [{self.done + self.errored}/{self.total}, {self._eta()}]"

    # ------------------------------------------------------------------------------------- Tune's hooks

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self.counted_resumed:
            return
        self.counted_resumed = True
        self.t0 = time.monotonic()
        finished = [t for t in trials if t.status == "TERMINATED"]
        if finished:  # a resumed sweep: Tune does not run these again
            self.done = len(finished)
            say(f"resumed: {len(finished)} of {self.total} trials had finished")
        self._bar()

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.started[trial.trial_id] = time.monotonic()
        say(f"start  {self.cell(trial)}")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if result.get("final"):  # the engine's last report: test metrics at the reported checkpoint
            self.results[trial.trial_id] = dict(result)

    def _seconds(self, trial) -> float:
        return time.monotonic() - self.started.get(trial.trial_id, time.monotonic())

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        seconds = self._seconds(trial)
        self.durations.append(seconds)
        self.done += 1
        progress = self._advance()
        say(f"done   {self.cell(trial)}: {self._metric_text(trial)}  ({seconds:.0f} s){progress}")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        say(
            f"retry  {self.cell(trial)}: {first_error_line(_error_of(trial))} (it resumes from its checkpoint)"
        )

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.errored += 1
        progress = self._advance()
        say(f"FAILED {self.cell(trial)}: {first_error_line(_error_of(trial))}{progress}")

    def on_experiment_end(self, trials: list, **info) -> None:
        # The bar stays open across the Tuners of an outer-grid sweep; it is closed when the last trial is in.
        if self.done + self.errored >= self.total:
            close_bar()


def close_bar() -> None:
    bar = _BAR.pop("bar", None)
    if bar is not None:
        bar.close()


def _error_of(trial) -> BaseException | None:
    """The trial's latest error. Tune writes it to the trial's local folder first and reads it back from the
    experiment's storage, which it syncs later: at `on_trial_recover` only the local copy exists yet."""
    with contextlib.suppress(Exception):
        local = trial.pickled_error_file
        if local and os.path.exists(local):
            import cloudpickle  # Ray's dependency; Tune pickles trial errors with it

            with open(local, "rb") as handle:
                return cloudpickle.load(handle)
    with contextlib.suppress(Exception):
        return trial.get_pickled_error() or trial.get_error()
    return None


def reuse_trial_processes(space) -> bool:
    """`TuneConfig(reuse_actors=...)`: run the next trial in the process of a finished one (same resources)
    when trials train in-process (`scaling.num_workers: 0`). A fresh trial process imports torch, timm and
    semimed again: ~4 s on an idle 2-core machine, ~10 s on a loaded one, more than a short CPU trial trains
    (the demo's trials take 10-30 s). `run_training` seeds and forks torch's RNG per run, so a reused process
    gives the same numbers as a fresh one; a trial whose process died is retried in a new one."""
    cells = space.cells or [{}]
    return space.trial_config(cells[0]).scaling.num_workers == 0
