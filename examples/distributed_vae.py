"""Data-parallel training of the digits VAE with torch.distributed.

Run on one machine with two processes (CPU: gloo; GPUs: NCCL, one per process):

```bash
torchrun --standalone --nproc_per_node=2 examples/distributed_vae.py --steps 200
```

Every step draws one global minibatch of `--batch-size` images (the same on
all ranks: the permutation is seeded by the step), and each rank takes its
contiguous shard of it (sizes differ by at most one). The wrapped objective
weights each rank's loss by its shard's share of the batch and sums the
gradients over ranks, so the update is the one a single process would make on
the whole minibatch. Particles are drawn independently on each rank (seeded by
rank). At the end every rank prints a checksum of its parameters, which must
agree, and the test log-likelihood is estimated on shards of the test set and
gathered.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib

import pyro
import torch
import torch.distributed as dist

from batchplate.distributed import (
    DistributedObjective,
    distributed_log_evidence,
    init_distributed,
    shard_indices,
)
from batchplate.examples.vae import VAE, load_data, make_objective


def checksum(module: torch.nn.Module) -> tuple[float, str]:
    """The sum of all parameters and a hash of their bytes."""
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in module.parameters()])
    return float(flat.sum()), hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--objective", default="iwae", help="elbo, iwae, vimco, rws or ws")
    parser.add_argument("-K", "--num-particles", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100, help="global minibatch size")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-particles", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout (s)")
    return parser.parse_args()


def train(args, vae: VAE, train_set: torch.Tensor, rank: int, world: int, device) -> None:
    """SVI steps on this rank's shard of each global minibatch."""
    objective = DistributedObjective(make_objective(args.objective, args.num_particles))
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": args.lr}), objective)
    mine = shard_indices(args.batch_size, rank, world).to(device)
    if rank == 0:
        print(
            f"{world} ranks ({dist.get_backend()}), global batch {args.batch_size}, "
            f"shards {[len(shard_indices(args.batch_size, r, world)) for r in range(world)]}, "
            f"objective {args.objective}, K={args.num_particles}",
            flush=True,
        )
    for step in range(1, args.steps + 1):
        # Seeded by the step, so every rank draws the same global minibatch.
        order = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        batch = torch.randperm(len(train_set), generator=order)[: args.batch_size].to(device)
        loss = svi.step(train_set[batch[mine]])  # the global minibatch's loss, on every rank
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            value = loss[0] + loss[1] if isinstance(loss, tuple) else loss
            print(f"step {step:5d}  loss {value:.4f}", flush=True)


def evaluate(args, vae: VAE, test: torch.Tensor, rank: int, world: int, device) -> None:
    """Check that the ranks agree on the parameters; estimate the test log-likelihood."""
    total, digest = checksum(vae)
    print(f"rank {rank}: parameter checksum sum={total:.10f} sha256={digest}", flush=True)
    sums = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(sums, torch.tensor([total], dtype=torch.float64, device=device))
    with torch.no_grad():
        part = test[shard_indices(len(test), rank, world).to(device)]
        log_px = distributed_log_evidence(
            vae.model,
            vae.guide,
            part,
            num_particles=args.eval_particles,
            chunk_size=50,
            max_plate_nesting=1,
        )
    if rank == 0:
        agree = all(float(s) == total for s in sums)
        print(f"ranks agree on parameters: {agree}")
        print(
            f"test log-likelihood (K={args.eval_particles}) over {len(log_px)} images: "
            f"{log_px.mean().item():.3f} nats"
        )
        if not agree:
            raise SystemExit("ranks disagree on parameters")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    rank, world, device = init_distributed(timeout=datetime.timedelta(seconds=args.timeout))
    train_set, test = load_data(seed=0, device=device)

    # Same initial parameters on every rank: seed, then broadcast rank 0's to be sure.
    torch.manual_seed(args.seed)
    pyro.clear_param_store()
    vae = VAE().to(device)
    for p in vae.parameters():
        dist.broadcast(p.data, src=0)
    # Independent particles on each rank: identical seeds would give different data the same noise.
    pyro.set_rng_seed(args.seed * 1000 + 1 + rank)

    train(args, vae, train_set, rank, world, device)
    evaluate(args, vae, test, rank, world, device)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
