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
import math
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

    def pick(self, *names: str) -> dict[str, Any]:
        """`{name: value}` of the named options, in the order given."""
        return {name: getattr(self, name) for name in names}


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


def run_example(example: Example, options: Options) -> dict:
    """Train `example` with `options`, save its figures and return its metrics."""
    out = common.output_dir(options.out_dir)
    stem = f"{example.name}-{options.objective}"
    label = stem + example.label(options)
    bar = common.progress_bar(options.steps, label, options.progress)
    start = time.perf_counter()
    history = example.train(options, bar)
    seconds = time.perf_counter() - start
    bar.close()
    paths = {
        key: common.save_figure(
            fig, out / (f"{stem}.png" if key == "plot" else f"{stem}-{key}.png")
        )
        for key, fig in example.figures(history, options).items()
    }
    metrics = example.metrics(history, options, seconds, paths)
    if options.progress:
        print(f"plot: {paths['plot']}")
        print(f"{label} {example.summary(metrics)}")
    return metrics


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
