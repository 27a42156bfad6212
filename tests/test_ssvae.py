"""The semi-supervised VAE M2 port (`batchplate.examples.ssvae`): `y` enumerated in the
guide under `batchplate.TraceEnum_ELBO` equals stock `pyro.infer.TraceEnum_ELBO`
divided by `B` on the same draws, labelled and unlabelled; the auxiliary loss is
stock `Trace_ELBO` / `B` and 0 on an unlabelled batch; the example runs."""

from __future__ import annotations

import json

import pyro
import pyro.infer as pi
import pytest
import torch
from pyro.infer import config_enumerate

import batchplate
from batchplate import batch_plate
from batchplate.examples import ssvae
from expect import assert_stock_over

B = 12
DATA = ssvae.load_data()


def trained_net(steps: int = 5) -> ssvae.SSVAE:
    """A small network after a few steps of the example's training (so the check is
    not at the initial weights), with both plates' programs available."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    options = ssvae.Options(objective="enum", z_dim=3, hidden=16, batch_size=B)
    net, svi, svi_aux = ssvae.make_svis(options)
    x, y = DATA["x_train"][: 2 * B], DATA["y_train"][: 2 * B]
    for t in range(steps):
        xs, ys = x[t % 2 * B :][:B], y[t % 2 * B :][:B]
        svi.step(xs, ys) if t % 2 else svi.step(xs)
        svi_aux.step(xs, ys)
    return net


def loss_and_grads(objective, model, guide, *args, seed: int = 3) -> tuple:
    pyro.set_rng_seed(seed)
    loss = objective.differentiable_loss(model, guide, *args)
    if not loss.requires_grad:  # a program without sample sites
        return loss.detach(), [torch.zeros_like(p) for p in NET.parameters()]
    grads = torch.autograd.grad(loss, list(NET.parameters()), allow_unused=True)
    grads = [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(NET.parameters(), grads, strict=True)
    ]
    return loss.detach(), grads


NET = trained_net()


def programs(plate, classify: bool = False) -> tuple:
    NET.plate = plate
    if classify:
        return NET.model_classify, NET.guide_classify
    return NET.model, config_enumerate(NET.guide, "parallel", expand=False)


@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_elbo_with_enumerated_label_equals_stock_over_B(labelled, reduction):
    xs, ys = DATA["x_train"][30 : 30 + B], DATA["y_train"][30 : 30 + B]
    args = (xs, ys) if labelled else (xs,)
    kw = {"max_plate_nesting": 1, "strict_enumeration_warning": False}
    stock = loss_and_grads(pi.TraceEnum_ELBO(**kw), *programs(pyro.plate), *args)
    ours_obj = batchplate.TraceEnum_ELBO(reduction=reduction, **kw)
    ours = loss_and_grads(ours_obj, *programs(batch_plate), *args)
    assert_stock_over(B if reduction == "mean" else 1.0, stock, ours)
    assert any(g.abs().sum() > 0 for g in ours[1])


def test_auxiliary_loss_is_stock_over_B_and_zero_without_labels():
    xs, ys = DATA["x_train"][:B], DATA["y_train"][:B]
    stock = loss_and_grads(pi.Trace_ELBO(), *programs(pyro.plate, True), xs, ys)
    ours = loss_and_grads(batchplate.Trace_ELBO(), *programs(batch_plate, True), xs, ys)
    assert_stock_over(B, stock, ours)
    loss = batchplate.Trace_ELBO().loss(*programs(batch_plate, True), xs)
    assert loss == 0.0
    assert pi.Trace_ELBO().loss(*programs(pyro.plate, True), xs) == 0.0


def test_run_trains_and_writes_metrics(tmp_path):
    metrics = ssvae.run(
        steps=8, batch_size=16, hidden=16, z_dim=3, eval_every=4, out_dir=tmp_path, progress=False
    )
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    saved = json.loads((tmp_path / "ssvae-enum-metrics.json").read_text())
    assert saved["test_accuracy"] == metrics["test_accuracy"]
    assert (tmp_path / "ssvae-enum.png").exists()


def test_compiled_objective_equals_stock_over_B():
    """`JitTraceEnum_ELBO` on an unlabelled batch: stock `JitTraceEnum_ELBO` / B on the
    same draws (a compiled step draws its noise differently from an uncompiled one,
    stock's as ours, so the counterpart is stock's compiled objective)."""
    xs = DATA["x_train"][70 : 70 + B]
    kw = {"max_plate_nesting": 1, "ignore_jit_warnings": True}
    stock = loss_and_grads(pi.JitTraceEnum_ELBO(**kw), *programs(pyro.plate), xs)
    jit = batchplate.JitTraceEnum_ELBO(**kw)
    ours = loss_and_grads(jit, *programs(batch_plate), xs)
    assert_stock_over(B, stock, ours)
