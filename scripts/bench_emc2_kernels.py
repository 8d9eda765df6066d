"""EMC²'s kernels on an exact small problem: how close each chain's law is to the global softmax, how close the
averaged gradient is to the global gradient, and what a step costs.

    OMP_NUM_THREADS=1 python scripts/bench_emc2_kernels.py                     # 40 samples, batch 4, τ 0.25
    OMP_NUM_THREADS=1 python scripts/bench_emc2_kernels.py --epochs 100 1000 --kernels paper official_scan

A fixed table of ``m`` anchor / positive embeddings stands for a frozen model, so the global loss
``L = mean_i [logsumexp_{j != i} s(x_i, y_j) - s(x_i, y_i)]``, its softmax ``p_i`` over the negatives and its
gradient are known exactly. Each kernel trains on it as the trainer does (a fresh permutation an epoch, batch
``B``, ``cross_view`` candidates, each chain's negative re-encoded from the table: the exact estimator) and is
scored over the second half of each run (the first half is burn-in):

* ``TV``: total-variation distance between the law of the negatives the gradient used (the states it averaged,
  with their weights) and ``p_i``, averaged over anchors; ``floor`` is the TV of as many exact draws from ``p_i``
  as the run had visits, the sampling noise alone;
* ``grad err``: ``|mean gradient - grad L| / |grad L|`` over both tables;
* ``ms/step``: the loss call alone (sampler included), on this machine.

Kernels: ``paper`` (one uniform proposal a step, the paper's), ``paper_k`` (``2(B-1)`` uniform proposals a step
with burn-in of half: this project's earlier default), ``official_scan`` (the official code's fixed-order scan
of every column, burn-in of half), and ``paper_norefresh`` (one proposal, chain negatives not re-encoded: anchors
whose negative is out of the batch are dropped).
"""

from __future__ import annotations

import argparse
import time

import torch

from simcse_flat.losses import EMC2Loss

KERNELS = {
    "paper": {"kernel": "paper", "proposals": 1},
    "paper_k": {"kernel": "paper", "proposals": None},  # 2(B-1), set from the batch size below
    "official_scan": {"kernel": "official_scan"},
    "paper_norefresh": {"kernel": "paper", "proposals": 1},
}


def table(m: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.randn(m, dim, generator=generator, dtype=torch.float64)
    return anchors, anchors + 0.7 * torch.randn(m, dim, generator=generator, dtype=torch.float64)


def run(name: str, anchors, positives, batch: int, tau: float, epochs: int, seed: int) -> dict:
    m = anchors.size(0)
    options = dict(KERNELS[name])
    if options.get("proposals", 1) is None:
        options["proposals"] = 2 * (batch - 1)
    loss_fn = EMC2Loss(dataset_size=m, temperature=tau, seed=seed, **options)
    refresh = name != "paper_norefresh"
    a, p = anchors.float().requires_grad_(), positives.float().requires_grad_()
    exact_loss = loss_fn.global_loss(a, p)
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact_loss, (a, p))]).double()
    target = torch.softmax(loss_fn.logits(a, p).detach().double().fill_diagonal_(float("-inf")), dim=1)

    counts = torch.zeros(m, m, dtype=torch.float64)  # soft counts of the negatives the gradient used
    visits = torch.zeros(m, dtype=torch.float64)
    sampler, step_of = loss_fn.sampler, sampler_step_recorder(loss_fn, counts, visits, refresh)
    sampler.step = step_of
    loss_sum, steps_recorded, seconds = torch.zeros(()), 0, 0.0
    order = torch.Generator().manual_seed(seed + 1)
    for epoch in range(epochs):
        recording = epoch >= epochs // 2
        step_of.recording = recording
        for ids in torch.randperm(m, generator=order).split(batch):
            if ids.numel() < batch:
                continue
            extra = {"chain_negatives": p[sampler.negatives_to_encode(ids)]} if refresh else {}
            start = time.perf_counter()
            loss, _ = loss_fn(a[ids], p[ids], torch.arange(batch), anchor_ids=ids, candidate_ids=ids, **extra)
            seconds += time.perf_counter() - start
            if recording:  # the tables are fixed: the mean gradient is the gradient of the mean loss
                loss_sum, steps_recorded = loss_sum + loss, steps_recorded + 1
    empirical = counts / counts.sum(dim=1, keepdim=True).clamp(min=1e-12)
    tv = 0.5 * (empirical - target).abs().sum(dim=1)[visits >= 1]
    draws = torch.Generator().manual_seed(seed + 2)
    seen = [i for i in range(m) if visits[i] >= 1]
    floor = [_tv_of_exact_draws(target[i], int(visits[i]), draws) for i in seen]
    mean_gradient = torch.cat([g.flatten() for g in torch.autograd.grad(loss_sum / steps_recorded, (a, p))]).double()
    return {
        "kernel": name,
        "epochs": epochs,
        "tv": tv.mean().item(),
        "floor": torch.stack(floor).mean().item(),
        "grad_err": ((mean_gradient - exact).norm() / exact.norm()).item(),
        "ms_per_step": 1000 * seconds / (epochs * (m // batch)),
    }


def _tv_of_exact_draws(target: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """TV between ``count`` exact draws from ``target`` and ``target``: the sampling noise of that many visits."""
    draws = torch.multinomial(target, count, replacement=True, generator=generator)
    return 0.5 * (torch.bincount(draws, minlength=target.numel()).double() / count - target).abs().sum()


def sampler_step_recorder(loss_fn: EMC2Loss, counts: torch.Tensor, visits: torch.Tensor, refresh: bool):
    """The sampler's ``step``, also adding each step's weights over the states held to ``counts`` (by sample id).
    Without ``refresh`` an anchor that held an out-of-batch state is left out of the gradient, and so here."""
    original = loss_fn.sampler.step

    def step(scores, proposable, anchor_ids, candidate_ids, *args, **kwargs):
        start = loss_fn.sampler.negative_ids[anchor_ids].clone()
        result = original(scores, proposable, anchor_ids, candidate_ids, *args, **kwargs)
        if step.recording:
            in_batch, outside = result.weights[:, :-1].double(), result.weights[:, -1].double()
            if not refresh:
                in_batch = in_batch * (outside == 0)[:, None]
            counts.index_put_((anchor_ids[:, None].expand_as(in_batch), candidate_ids.expand_as(in_batch)),
                              in_batch, accumulate=True)  # fmt: skip
            held = start >= 0
            counts.index_put_((anchor_ids[held], start[held]), outside[held], accumulate=True)
            visits[anchor_ids] += 1 if refresh else (outside == 0).double()
        return result

    step.recording = False
    return step


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, nargs="+", default=[300, 3000])
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    anchors, positives = table(args.samples, args.dim, args.seed)
    rows = [run(name, anchors, positives, args.batch_size, args.temperature, epochs, args.seed)
            for name in args.kernels for epochs in args.epochs]  # fmt: skip
    print(f"m = {args.samples}, batch {args.batch_size}, τ = {args.temperature}, dim {args.dim}, seed {args.seed}; "
          "scored over the second half of each run")  # fmt: skip
    print("| kernel | epochs | TV to global softmax | TV floor (exact draws) | grad err | ms/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kernel']} | {r['epochs']} | {r['tv']:.3f} | {r['floor']:.3f} | {r['grad_err']:.3f} "
              f"| {r['ms_per_step']:.2f} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
