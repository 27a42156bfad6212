"""Generate docs/troubleshooting.md: run each trigger, paste its actual message.

Run ``python tools/gen_troubleshooting.py`` after changing an error message;
tests/test_docs.py checks the page against the live messages.
"""

import pathlib
import textwrap
import warnings

import pyro

from batchplate import BatchPlateError

warnings.simplefilter("ignore")

SETUP = """\
import pyro
import pyro.distributions as dist
import torch
from torch import nn

import batchplate
from batchplate import BatchPlateError, RenyiELBO, Trace_ELBO, batch_plate

x = torch.tensor([9.5, 9.1, 9.2])  # a minibatch of three measurements
elbo = Trace_ELBO()


def model(x):
    with batch_plate("data", len(x)):
        w = pyro.sample("w", dist.Normal(8.5, 1.0))
        pyro.sample("x", dist.Normal(w, 0.75), obs=x)


def guide(x):
    with batch_plate("data", len(x)):
        pyro.sample("w", dist.Normal(x, 1.0))


def seq_model(x):
    for i in batch_plate("data", len(x)):
        w = pyro.sample(f"w_{i}", dist.Normal(8.5, 1.0))
        pyro.sample(f"x_{i}", dist.Normal(w, 0.75), obs=x[i])


def seq_guide(x):
    for i in batch_plate("data", len(x)):
        pyro.sample(f"w_{i}", dist.Normal(x[i], 1.0))


elbo.loss(model, guide, x), elbo.loss(seq_model, seq_guide, x)  # both fine
"""

CASES = [
    (
        "A site outside the batch plate (a global latent)",
        """Rule: every sample site of model and guide lies inside the one batch plate.
A latent shared by all data (here a prior mean `mu`) makes the data of a
minibatch dependent, so per-datum objectives do not apply.""",
        """\
def global_model(x):
    mu = pyro.sample("mu", dist.Normal(8.5, 1.0))  # shared by every datum
    with batch_plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 0.75), obs=x)


def global_guide(x):
    pyro.sample("mu", dist.Normal(9.0, 0.1))


RenyiELBO(num_particles=2).loss(global_model, global_guide, x)
""",
        """Either the quantity is really global: then the model is not a minibatch of
independent data; use `pyro.plate` and Pyro's own objectives, or make `mu` a
parameter (`pyro.param`) learned by maximum likelihood. Or it is per datum:
draw it inside the batch plate.""",
    ),
    (
        "No batch plate at all",
        """The program still uses `pyro.plate` (or no plate) for the minibatch.""",
        """\
def pyro_model(x):
    with pyro.plate("data", len(x)):
        w = pyro.sample("w", dist.Normal(8.5, 1.0))
        pyro.sample("x", dist.Normal(w, 0.75), obs=x)


def pyro_guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("w", dist.Normal(x, 1.0))


elbo.loss(pyro_model, pyro_guide, x)
""",
        """Replace the plate over the minibatch by `batch_plate`, in model and guide
(see [Migrating](migration.md)).""",
    ),
    (
        "A guide site outside the batch plate",
        """Problem 3 of Pyro issue #2220: the guide draws a latent outside the batch plate
while the model draws it inside, so one draw serves several data.""",
        """\
def loop_guide(x):
    for i in range(len(x)):  # a plain Python loop, not the batch plate
        pyro.sample(f"w_{i}", dist.Normal(x[i], 1.0))


elbo.loss(seq_model, loop_guide, x)
""",
        """Draw the site inside the same batch plate as the model, from that datum's
input only (`seq_guide` above).""",
    ),
    (
        "A guide site drawn at another datum",
        """With a sequential batch plate, each datum's latents must be drawn in that
datum's iteration. Here the guide draws datum 1's latent in iteration 0.""",
        """\
def shifted_guide(x):
    for i in batch_plate("data", len(x)):
        j = (i + 1) % len(x)
        pyro.sample(f"w_{j}", dist.Normal(x[j], 1.0))


elbo.loss(seq_model, shifted_guide, x)
""",
        """Sample `w_i` in iteration `i`, conditioned on `x[i]`.""",
    ),
    (
        "Model and guide disagree on the batch plate",
        """Model and guide must use the same batch plate: same name, size,
subsample, dim, and both vectorized or both sequential.""",
        """\
def renamed_guide(x):
    with batch_plate("batch", len(x)):  # the model's plate is "data"
        pyro.sample("w", dist.Normal(x, 1.0))


elbo.loss(model, renamed_guide, x)
""",
        """Use the same `batch_plate(name, size, ...)` call in both (a helper function
that returns it is a good way).""",
    ),
    (
        "Two batch plates in one program",
        """A program has exactly one batch plate. Here the model opens a second one
for the observations.""",
        """\
def two_plate_model(x):
    with batch_plate("data", len(x)):
        w = pyro.sample("w", dist.Normal(8.5, 1.0))
    with batch_plate("data2", len(x)):
        pyro.sample("x", dist.Normal(w, 0.75), obs=x)


elbo.loss(two_plate_model, guide, x)
""",
        """Reuse one plate for every datum-level site (open it once, or reuse the
plate object: `data = batch_plate("data", len(x))` then `with data:` twice).""",
    ),
    (
        "Nested batch plates",
        """A batch plate inside another. Plates inside a datum (pixels, time steps,
words) are ordinary plates.""",
        """\
def nested_model(x):
    with batch_plate("data", len(x)):
        with batch_plate("pixels", 2):
            pyro.sample("w", dist.Normal(8.5, 1.0))


elbo.loss(nested_model, nested_model, x)
""",
        """Use `pyro.plate` for the inner plate. (Pyro appends the shapes of the
trace so far to errors raised while tracing.)""",
    ),
    (
        "A loop over the plate that ends early",
        """The first program of Pyro issue #2220: a `return` inside `for i in pyro.plate(...)`
ended the loop after the first datum, and training silently used datum 0
only.""",
        """\
def early_model(x):
    for i in batch_plate("data", len(x)):
        w = pyro.sample(f"w_{i}", dist.Normal(8.5, 1.0))
        return pyro.sample(f"x_{i}", dist.Normal(w, 0.75), obs=x[i])


def early_guide(x):
    for i in batch_plate("data", len(x)):
        return pyro.sample(f"w_{i}", dist.Normal(x[i], 1.0))


elbo.loss(early_model, early_guide, x)
""",
        """Let the loop run over every datum; collect per-datum results in a list if
the program must return them.""",
    ),
    (
        "Non-finite log weights",
        """A log weight of datum `b` is `-inf`, `+inf` or NaN. batchplate stops with
the datum, its index in the dataset and the offending sites, instead of
returning NaN parameters a few steps later. Here one measurement is
infinite.""",
        """\
corrupt = torch.tensor([9.5, float("inf"), 9.2])
elbo.loss(model, guide, corrupt)
""",
        """Check the data at the reported indices; check that the guide's support
matches the model's (a guide proposing values the model gives zero density);
check the guide's parameters (a scale that reached 0).""",
    ),
    (
        "Control flow on sampled values under `vectorize_particles=True`",
        """A program whose structure depends on sampled values cannot be traced with
all particles at once.""",
        """\
def geometric(b, logits, t=0):
    if pyro.sample(f"g_{b}_{t}", dist.Bernoulli(logits=logits)) == 1:
        return 0
    return 1 + geometric(b, logits, t + 1)


def geo_model(obs):
    for b in batch_plate("batch", len(obs)):
        g = geometric(b, torch.tensor(0.0))
        hit = torch.tensor(float(g == obs[b]))
        pyro.sample(f"obs_{b}", dist.Bernoulli(probs=torch.tensor(0.99)), obs=hit)


def geo_guide(obs):
    for b in batch_plate("batch", len(obs)):
        geometric(b, pyro.param("guide_logits", torch.tensor(0.0)))


iwae = RenyiELBO(alpha=0, num_particles=4, vectorize_particles=True, max_plate_nesting=1)
iwae.loss(geo_model, geo_guide, torch.tensor([1, 2, 3]))
""",
        """Use `vectorize_particles=False` (one trace per particle), or write the
program in padded form (see [Padded traces](padded.md)).""",
    ),
    (
        "No sample sites",
        """Model and guide sample nothing (for example, the data were never
observed).""",
        """\
def empty(x):
    pass


batchplate.log_weights(empty, empty, x)  # the objectives return 0, as Pyro's do
""",
        """Observe the data inside the batch plate with
`pyro.sample(..., obs=...)`.""",
    ),
    (
        "A padded loop that reaches `max_steps` (`PaddedLoopError`)",
        """`PaddedLoopError`, a `BatchPlateError`, is raised by a padded loop
(`batchplate.Lanes`, see [Padded traces](padded.md)) that reaches its
`max_steps` while some lanes are still running. Here a geometric loop with
success probability 0.01 gets 3 steps.""",
        """\
def padded_geometric():
    with batch_plate("data", len(x)):
        lanes = batchplate.Lanes("g", max_steps=3)
        for _ in lanes:
            flip = lanes.sample(dist.Bernoulli(logits=torch.tensor(-4.6)))
            lanes.finish(flip == 1)


torch.manual_seed(0)
padded_geometric()
""",
        """Raise `max_steps` (the trace only has as many steps as its longest lane
needs, so a generous bound costs nothing on typical draws), or pass
`on_max="warn"` when truncating is part of your model.""",
    ),
    (
        "A batch plate without a size",
        """`batch_plate` needs the number of data `N` (the dataset size when
subsampling, else the minibatch size).""",
        """\
batch_plate("data", None)
""",
        """Pass `len(dataset)` with `subsample_size=` or `subsample=`, or `len(x)` for
a minibatch `x`.""",
    ),
    (
        "A density whose event dims run over the minibatch",
        """Inside a vectorized batch plate each datum must be its own batch element.
A distribution whose event dims span the data (`.to_event(1)` over the batch, or
a multivariate distribution over it) is broadcast by the plate, and every datum
would carry the joint density of all of them.""",
        """\
def joint_model(x):
    with batch_plate("data", len(x)):
        w = pyro.sample("w", dist.Normal(8.5, 1.0))
        pyro.sample("x", dist.Normal(w.expand(3), 0.75).to_event(1), obs=x)


elbo.loss(joint_model, guide, x)
""",
        """Give each datum its own batch element: `dist.Normal(w, 0.75)` with `w` of
shape `[B]` (or `[B, D]` with `.to_event(1)` over `D` only). If every datum really
observes the same vector, expand it to the batch: `obs=value.expand(B, D)`.""",
    ),
    (
        "Data coupled by the guide (`check_batch_independence`)",
        """Batch normalization in training mode computes statistics of the whole
minibatch, so datum `b`'s guide depends on every other datum. The program's
structure does not show it; the opt-in check measures it with autograd.""",
        """\
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def batchnorm_guide(x):
    pyro.module("net", net)
    with batch_plate("data", len(x)):
        loc, log_scale = net(x.unsqueeze(-1)).unbind(-1)
        pyro.sample("w", dist.Normal(loc, log_scale.exp()))


batchplate.check_batch_independence(model, batchnorm_guide, x)
""",
        """Use a per-datum normalization (`nn.LayerNorm`), or put batch normalization
in `eval()` mode; run the check once before training.""",
    ),
]

CASES += [
    (
        "Model and guide disagree on the latent sites",
        """Strict matching, on whether or not Pyro's validation is: the guide must sample
every latent site of the model, under the same name, and nothing else. A guide
site with a typo leaves the model's latent to be drawn from its prior (weighed as
if the guide had proposed it) and adds `-log q` of a site the model never sees.""",
        """\
def typo_guide(x):
    with batch_plate("data", len(x)):
        pyro.sample("ww", dist.Normal(x, 1.0))


elbo.loss(model, typo_guide, x)
""",
        """Use the model's names; the message names the nearest one. A site hidden by
`poutine.block` in the guide shows up the same way.""",
    ),
    (
        "An observed site in the guide",
        """A guide proposes latents; `obs=` (or `poutine.condition`) in the guide adds
`log q` of a value it did not draw.""",
        """\
def observing_guide(x):
    with batch_plate("data", len(x)):
        pyro.sample("w", dist.Normal(x, 1.0))
        pyro.sample("x", dist.Normal(x, 1.0), obs=x)


elbo.loss(model, observing_guide, x)
""",
        """Remove `obs=` from the guide. To weigh model and guide at given latent values,
use `batchplate.log_weights(model, batchplate.replay_latents(guide, values), x)`.""",
    ),
    (
        "A non-finite gradient",
        """A step whose loss or any gradient is NaN or infinite is refused as a whole:
`loss_and_grads` leaves every `.grad` as it was, and under `pyro.infer.SVI` the
parameters and the optimizer state are unchanged too.""",
        """\
def sqrt_guide(x):
    s = pyro.param("s", torch.zeros(3))
    with batch_plate("data", len(x)):
        pyro.sample("w", dist.Normal(x, 0.5 + s.abs() ** 0.5))  # infinite slope at s = 0


svi = pyro.infer.SVI(model, sqrt_guide, pyro.optim.Adam({"lr": 0.1}), elbo)
svi.step(x)
""",
        """Fix the parameterization (here a scale with an infinite derivative at 0), or
lower the learning rate. To skip such steps instead, catch the error:
`try: svi.step(x)` / `except BatchPlateError: pass` (the step changed nothing).""",
    ),
    (
        "NaN in the data",
        """A NaN or infinite value in an input fails inside the program; batchplate names
the rows (data) that hold it before Pyro's support error.""",
        """\
bad = x.clone()
bad[1] = float("nan")
elbo.loss(model, guide, bad)
""",
        """Remove or impute those data.""",
    ),
    (
        "Bad minibatch indices or sizes",
        """Explicit `subsample=` indices must be distinct integers in `[0, size)`, and
`subsample_size` at most `size`; an empty batch and a particle count that is not
a positive int (`0`, `-1`, `True`) are refused the same way.""",
        """\
with batch_plate("data", 10, subsample=torch.tensor([3, 99])):
    pass
""",
        """Draw indices with `torch.randperm(size)[:B]`, or let the plate subsample
(`subsample_size=B`).""",
    ),
]

CASES += [
    (
        "A padded loop whose model finishes differently from its guide",
        """A padded loop (`batchplate.Lanes`) runs in model and guide; the model
replays the guide's values, so with the same done test both finish every lane
at the same step. Here the model's loop waits one more step: where the two
loops happen to run as many steps overall, the site names coincide, but a lane
still running in the guide is finished in the model, and its `log q` has no
`log p`. batchplate compares the lanes of every step.""",
        """\
def lanes_guide(x):
    with batch_plate("data", len(x)):
        lanes = batchplate.Lanes("g", max_steps=50)
        for t in lanes:
            lanes.finish(lanes.sample(dist.Bernoulli(0.3)) == 1)


def lanes_model(x):
    with batch_plate("data", len(x)):
        lanes = batchplate.Lanes("g", max_steps=50)
        for t in lanes:
            flip = lanes.sample(dist.Bernoulli(0.5))
            lanes.finish((flip == 1) & (t >= 1))  # the guide's test is flip == 1


pyro.set_rng_seed(0)
batchplate.log_weights(lanes_model, lanes_guide, x, num_particles=3)
""",
        """Use the guide's done test in the model (a function of the sampled values and
the data only); when the loops run a different number of steps overall, the
message names the step sites instead.""",
    ),
    (
        "Data coupled without a gradient (`check_batch_independence`)",
        """A statistic of the whole minibatch that has no gradient (a comparison with
the median, a detached mean) escapes the autograd check. The permutation check
runs the program again on the minibatch reordered, on each half of it and on
single data, replaying every datum's latents with the datum: each datum's log
weight must stay the same.""",
        """\
def median_guide(x):
    with batch_plate("data", len(x)):
        pyro.sample("w", dist.Normal(x + (x > x.median()).float(), 1.0))


batchplate.check_batch_independence(model, median_guide, x)
""",
        """Compute per-datum features from the datum alone; a statistic of the dataset
belongs outside the program (computed once, passed in as a constant).""",
    ),
]

# Cases that need several processes: each rank runs the code (under `torchrun`, here 2
# local gloo ranks), so test_docs.py cannot exec them: their blocks are fenced `py`.
DISTRIBUTED_CASES = [
    (
        "Ranks with different objective settings (`DistributedObjective`)",
        """Every step of `batchplate.distributed.DistributedObjective` starts with one
exchange between the ranks, which compares the objective each rank runs (its
class and settings: `reduction`, `num_particles`, `alpha`, `insomnia`,
`estimator`, `vectorize_particles`, ...). Ranks that disagree would combine
different quantities into one "global" loss; every rank raises the same error
instead. Run with `torchrun --nproc_per_node=2 script.py`:""",
        """\
from batchplate.distributed import DistributedObjective, init_distributed

rank, world, _ = init_distributed()
shard = x[:2] if rank == 0 else x[2:]
reduction = "mean" if rank == 0 else "sum"  # rank 1 was built with other settings
DistributedObjective(Trace_ELBO(reduction=reduction)).loss(model, guide, shard)
""",
        """Build the same objective, with the same keyword arguments, on every rank.""",
    ),
    (
        "A rank without data (`DistributedObjective`)",
        """Every rank needs at least one datum of the minibatch. A rank whose shard is
empty fails in its forward pass; its peers, waiting for it in the exchange,
learn why and raise the same error (no rank takes the step, no rank waits for
a collective timeout).""",
        """\
from batchplate.distributed import DistributedObjective, init_distributed

rank, world, _ = init_distributed()
shard = x if rank == 0 else x[:0]  # all 3 data on rank 0, none on rank 1
DistributedObjective(Trace_ELBO()).loss(model, guide, shard)
""",
        """Shard a minibatch of at least as many data as ranks
(`batchplate.distributed.shard_indices(B)` gives every rank one when `B` is at
least the world size), or start fewer ranks. The same agreement covers any
failure of one rank, in the forward or the backward pass (a NaN gradient, an
exception): every rank raises, naming the rank and its error, and every rank's
`.grad` stays as it was.""",
    ),
]


def run_on_two_ranks(code: str) -> str:
    """Run `code` after the set-up on 2 local gloo ranks (as `torchrun` would); return
    rank 0's `BatchPlateError` message (every rank raises the same one)."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile

    script = SETUP + "\n" + code
    wrapper = (
        "import sys, traceback\nfrom batchplate import BatchPlateError\n"
        f"try:\n    exec({script!r}, {{}})\nexcept BatchPlateError as e:\n"
        "    print(f'{type(e).__name__}: {e}')\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outputs = []
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "rank.py"
        path.write_text(wrapper)
        procs = []
        for rank in (0, 1):
            env = dict(
                os.environ,
                RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                GLOO_SOCKET_IFNAME="lo",
                CUDA_VISIBLE_DEVICES="",
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(path)], env=env, stdout=subprocess.PIPE, text=True
                )
            )
        outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    if not outputs[0].startswith("BatchPlateError") or outputs[0] != outputs[1]:
        raise SystemExit(f"the ranks did not raise the same BatchPlateError: {outputs}")
    return outputs[0]


def section(title: str, cause: str, code: str, fix: str, msg: str, fence: str) -> str:
    msg = "\n".join(line.rstrip() for line in msg.splitlines())
    wrapped = "\n".join(
        textwrap.fill(line, 88, break_long_words=False, break_on_hyphens=False)
        if len(line) > 88
        else line
        for line in msg.splitlines()
    )
    return (
        f"## {title}\n\n{cause}\n\n```{fence}\n# raises BatchPlateError\n{code}```\n\n"
        f"```text\n{wrapped}\n```\n\n**Fix.** {fix}\n"
    )


ns = {}
exec(SETUP, ns)
out = [
    """# Troubleshooting

batchplate raises one exception type, `BatchPlateError` (a `ValueError`;
padded loops raise its subclass `PaddedLoopError`), when a program breaks an
assumption of per-datum objectives, rather than return a silently wrong
number. Each section below shows a small program
that triggers the error, the message it prints (pasted from a real run, and
checked by the test suite) and the fix. The rules themselves are stated on the
[Contract](contract.md#structural-rules) page.

The examples share this set-up, a batch of three measurements with the scale
model of [Pyro issue #2220](https://github.com/pyro-ppl/pyro/issues/2220),
vectorized and sequential:

```python
"""
    + SETUP
    + "```\n"
]
for title, cause, code, fix in CASES:
    pyro.clear_param_store()
    try:
        exec(code, ns)
    except BatchPlateError as e:
        msg = f"{type(e).__name__}: {e}"
    else:
        raise SystemExit(f"no error for {title}")
    out.append(section(title, cause, code, fix, msg, "python"))
for title, cause, code, fix in DISTRIBUTED_CASES:
    out.append(section(title, cause, code, fix, run_on_two_ranks(code), "py"))
out.append("""## Warnings from Pyro

batchplate's objectives run Pyro's own model/guide checks first, so Pyro's
messages (shape mismatches, "Found plate statements in guide but not model",
invalid `log_prob` shapes) can appear before batchplate's. They mean what they
mean in Pyro; fix them as there.
""")
(pathlib.Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").write_text(
    "\n".join(out)
)
print("ok")
