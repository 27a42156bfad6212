"""What the examples share: their objectives by the names `batchplate run` accepts,
the optimizer with a decaying learning rate, and the progress bar, output folder
and plot saving around each training run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyro

import batchplate

#: `rws` is wake-wake (insomnia 1), `ws` wake-sleep (insomnia 0).
ALL = ("elbo", "iwae", "vimco", "rws", "ws")


def make_objective(
    name: str,
    num_particles: int,
    *,
    vectorize_particles: bool = True,
    max_plate_nesting: int = 1,
    allowed: Sequence[str] = ALL,
    autobatch: bool = False,
) -> batchplate.BatchObjective:
    """The batchplate objective called `name` with `K = num_particles`.

    The examples' only vectorized plate is the batch plate, hence
    `max_plate_nesting=1`; `allowed` is the example's own list, named in the error;
    `autobatch` runs a sequential program's lanes batched.
    """
    if name not in allowed:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(allowed)}")
    kw = {
        "num_particles": num_particles,
        "vectorize_particles": vectorize_particles,
        "max_plate_nesting": max_plate_nesting,
        "autobatch": autobatch,
    }
    if name == "elbo":
        return batchplate.Trace_ELBO(**kw)
    if name == "iwae":
        return batchplate.RenyiELBO(alpha=0.0, **kw)
    if name == "vimco":
        return batchplate.VIMCO(**kw)
    return batchplate.ReweightedWakeSleep(insomnia=1.0 if name == "rws" else 0.0, **kw)


# -- what every example's run() does around its training loop -------------------


def check_choice(kind: str, value: str, choices: Sequence[str]) -> None:
    """`ValueError` naming the choices when `value` is not one of them."""
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")


def output_dir(out_dir: str | Path) -> Path:
    """`out_dir` as a `Path`, created if missing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def progress_bar(total: int, desc: str, progress: bool, mininterval: float = 0.5) -> Any:
    """A tqdm bar, silent when `progress` is false (tests, sweeps)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, mininterval=mininterval)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write as PNG and close `fig`; returns `path`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def decaying_adam(lr: float, lr_final: float | None, steps: int) -> pyro.optim.PyroOptim:
    """Adam whose learning rate decays geometrically from `lr` to `lr_final` over
    `steps` (constant when `lr_final` is None), so that short runs end with little
    SGD noise; no gradient clipping."""
    decay = 1.0 if lr_final is None else (lr_final / lr) ** (1.0 / max(1, steps))
    return pyro.optim.ClippedAdam({"lr": lr, "lrd": decay, "clip_norm": math.inf})
