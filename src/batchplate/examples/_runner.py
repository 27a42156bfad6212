"""The `run()` skeleton every example shares.

An example describes itself with an `Options` dataclass (the keywords of its
`run()`, with its defaults) and an `Example` (how to train, what to plot, which
metrics to report); `run_example` does the rest: it checks the options, makes
the output folder, shows a progress bar, times the training, saves the figures
and prints the summary. `train_loop` is the minibatch loop with a running loss
that the examples' `train()` functions share.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from batchplate.examples import _common as common


@dataclass(frozen=True, kw_only=True)
class Options:
    """The keywords every example's `run()` takes.

    Each example subclasses it, giving these fields its own defaults and adding
    its own options. Values are checked on construction: an unknown keyword is
    a `TypeError`, an objective or choice not in the example's lists a
    `ValueError`.

    :param objective: the objective's name, one of the example's `OBJECTIVES`.
    :param num_particles: particles per datum, `K`.
    :param batch_size: minibatch size `B`.
    :param steps: optimizer steps.
    :param lr: learning rate.
    :param seed: random seed of the run.
    :param out_dir: folder of the figures (created if missing).
    :param progress: show a progress bar and print a summary line.
    """

    OBJECTIVES: ClassVar[tuple[str, ...]] = common.ALL
    #: Options with a fixed set of values: option name -> allowed values.
    CHOICES: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    objective: str
    num_particles: int
    batch_size: int
    steps: int
    lr: float
    seed: int = 0
    out_dir: str | Path = "batchplate-runs"
    progress: bool = True

    def __post_init__(self) -> None:
        common.check_choice("objective", self.objective, self.OBJECTIVES)
        for name, choices in self.CHOICES.items():
            common.check_choice(name, getattr(self, name), choices)
        for f in dataclasses.fields(self):
            check_number(f.name, getattr(self, f.name), f.default)
        size = getattr(self, "dataset_size", None)
        if size is not None and self.batch_size > size:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than dataset_size={size}; "
                "a minibatch is drawn from the dataset"
            )

    def pick(self, *names: str) -> dict[str, Any]:
        """`{name: value}` of the named options, in the order given."""
        return {name: getattr(self, name) for name in names}


def check_number(name: str, value: Any, default: Any) -> None:
    """`ValueError` unless `value` has its default's numeric type and range.

    An option whose default is an int takes ints only (no bools, floats or
    strings), at least 1 when the default is positive and at least 0 else; a
    float option takes finite numbers, positive when its default is. Options
    without a numeric default are not checked here.
    """
    if isinstance(default, bool) or default is dataclasses.MISSING:
        default = {"num_particles": 1, "batch_size": 1, "steps": 1, "lr": 1.0}.get(name)
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return
    if isinstance(default, int):
        low = 1 if default > 0 else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if not ok or not math.isfinite(value) or (default > 0 and value <= 0):
        kind = "a positive finite number" if default > 0 else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def defaults(options: type[Options]) -> dict[str, Any]:
    """The defaults of an example's own options and of the five training options
    (not of `seed`, `out_dir`, `progress`, which every example shares)."""
    shared = {"seed", "out_dir", "progress"}
    return {
        f.name: f.default
        for f in dataclasses.fields(options)
        if f.default is not dataclasses.MISSING and f.name not in shared
    }


@dataclass(frozen=True)
class Example:
    """What `run_example` needs to know about one example.

    :param name: the example's name, first part of the output files' names.
    :param train: `(options, bar) -> history`; advances `bar` once a step.
    :param figures: `(history, options) -> {key: figure}`; key `"plot"` is
        saved as `<name>-<objective>.png`, any other as `<name>-<objective>-<key>.png`.
    :param metrics: `(history, options, seconds, paths) -> metrics`, `paths`
        being the saved figures by key; it may write further outputs.
    :param summary: `metrics -> str`, printed after the run's label.
    :param label: `options -> str` added to the label (`" (padded)"`).
    """

    name: str
    train: Callable[[Any, Any], dict]
    figures: Callable[[dict, Any], dict[str, Any]]
    metrics: Callable[[dict, Any, float, dict[str, Path]], dict]
    summary: Callable[[dict], str]
    label: Callable[[Any], str] = lambda options: ""


class SetupError(RuntimeError):
    """What `run_example` checks before training: a missing plotting dependency or an
    output folder that cannot be written."""


def preflight(out_dir: str | Path) -> Path:
    """Check what the end of a run needs before it starts; returns the output folder."""
    missing = [m for m in ("matplotlib", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        raise SetupError(
            f"batchplate run needs {' and '.join(missing)} to plot; install them with "
            "pip install 'batchplate[examples]' (or pip install matplotlib tqdm)"
        )
    try:
        out = common.output_dir(out_dir)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise SetupError(f"cannot write to the output folder {str(out_dir)!r}: {e}") from e
    return out


def run_example(example: Example, options: Options) -> dict:
    """Train `example` with `options`; write and print its metrics, then save its figures.

    Dependencies and the output folder are checked before training
    (`SetupError`). The metrics (`<name>-<objective>-metrics.json`) are written
    before any figure, so a failure to plot still leaves them; it is then
    reported in `metrics["plot_error"]`.
    """
    out = preflight(options.out_dir)
    stem = f"{example.name}-{options.objective}"
    label = stem + example.label(options)
    bar = common.progress_bar(options.steps, label, options.progress)
    start = time.perf_counter()
    history = example.train(options, bar)
    seconds = time.perf_counter() - start
    bar.close()
    try:
        figures, error = example.figures(history, options), None
    except Exception as e:  # a plotting failure must not lose the run's metrics
        figures, error = {"plot": None}, e
    paths = {
        key: out / (f"{stem}.png" if key == "plot" else f"{stem}-{key}.png") for key in figures
    }
    metrics = example.metrics(history, options, seconds, paths)
    _write_metrics(metrics, out / f"{stem}-metrics.json")
    if options.progress:
        print(f"{label} {example.summary(metrics)}")
    if error is None:
        error = _save_figures(figures, paths)
    if error is not None:
        metrics["plot_error"] = f"{type(error).__name__}: {error}"
        _write_metrics(metrics, out / f"{stem}-metrics.json")
        print(f"{label}: plotting failed ({metrics['plot_error']})", file=sys.stderr)
    elif options.progress:
        print(f"plot: {paths['plot']}")
    return metrics


def _save_figures(figures: dict, paths: dict[str, Path]) -> Exception | None:
    try:
        for key, fig in figures.items():
            common.save_figure(fig, paths[key])
    except Exception as e:  # reported with the metrics, which are already computed
        return e
    return None


def _write_metrics(metrics: dict, path: Path) -> None:
    path.write_text(json.dumps(metrics, indent=2, default=str) + "\n")


def train_loop(
    step: Callable[[int], Any],
    steps: int,
    *,
    every: int,
    record: Callable[[int, float], Mapping[str, str] | None],
    bar: Any = None,
    smoothing: float = 0.05,
) -> float:
    """Call `step(t)` for `t = 1 .. steps`; return the final running loss.

    `step` returns the loss, or RWS's pair `(wake-theta, phi)` of which the
    first counts. The running loss is an exponential moving average with
    weight `smoothing` on the newest loss. Every `every` steps and at the last
    one, `record(t, running)` sees the state; what it returns, if anything,
    becomes the progress bar's postfix.
    """
    running = math.nan
    for t in range(1, steps + 1):
        loss = step(t)
        loss = loss[0] if isinstance(loss, tuple) else loss
        running = loss if math.isnan(running) else (1 - smoothing) * running + smoothing * loss
        if t % every == 0 or t == steps:
            postfix = record(t, running)
            if bar is not None and postfix:
                bar.set_postfix(**postfix)
        if bar is not None:
            bar.update(1)
    return running


def timing(seconds: float, steps: int) -> dict[str, float]:
    """`seconds` and `ms_per_step` of a run."""
    return {"seconds": seconds, "ms_per_step": 1000 * seconds / max(1, steps)}
