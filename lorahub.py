"""
The LoRAHub baseline (Huang et al. 2024, and the paper's lorahub/ code): one LoRA whose A and B are
weighted sums of the frozen experts', A = sum_i w_i A_i and B = sum_i w_i B_i (merged separately), with
the E weights w in [-1.5, 1.5] found by a gradient-free search that lowers

    objective(w) = mean token cross-entropy on --examples stage-2 traces + --l1 * sum_i |w_i|

The search is a seeded (1+1) evolution strategy: it starts from the uniform merge (w_i = 1/E, eval.py's
`merge`), tries one Gaussian step at a time and keeps it when the objective falls; the step widens
after a success and narrows after a failure. --steps evaluations of the objective in all (the paper's
code: Nevergrad's NGOpt, 40). The traces are the first ones of each domain, as stage 2 reads them.

    python lorahub.py        # writes OUT/mor/lorahub.pt: an adapter, its weights and search in meta
"""
import copy
import math
import os

import numpy as np
import torch

from common import (Timer, die, encode_example, first_distinct, load_base, make_out_dir, parse_args, read_traces,
                    training_batch)
from eval import expert_files
from lora import apply_adapter, load_adapter, save_adapter, weighted_adapter

BOUND = 1.5


def search(objective, E, steps, seed):
    """(best w, its objective, the best objective after each evaluation): a (1+1) evolution strategy."""
    rng = np.random.default_rng(seed)
    best = np.full(E, 1.0 / E)
    best_f = objective(best)
    history, sigma = [best_f], 0.5
    for _ in range(steps - 1):
        w = np.clip(best + sigma * rng.standard_normal(E), -BOUND, BOUND)
        f = objective(w)
        if f < best_f:
            best, best_f, sigma = w, f, sigma * 1.5
        else:
            sigma *= 0.85
        history.append(best_f)
    return best, best_f, history


def make_objective(model, ads, batch, l1):
    """objective(w): the merged adapter's tensors copied into model's LoRA layers, then its loss."""
    idx, tgt, pos, mask, _ = batch
    layers = apply_adapter(model, ads[0])

    @torch.no_grad()
    def objective(w):
        ad, _ = weighted_adapter(ads, w)
        for n, m in layers.items():
            m.A.copy_(ad["tensors"][f"{n}.A"])
            m.B.copy_(ad["tensors"][f"{n}.B"])
        _, loss = model(idx, tgt, pos=pos, mask=mask)
        return loss.item() + l1 * float(np.abs(w).sum())
    return objective


def main():
    args = parse_args(__doc__, ["lorahub"])
    timer = Timer()
    base, enc, base_ckpt = load_base(args.out_dir, args.device)
    paths = expert_files(args)
    if not paths:
        die(f"no RLVF expert in {os.path.join(args.out_dir, 'experts')} (run train_expert.py first)")
    ads = [load_adapter(p, base_ckpt) for p in paths.values()]
    _, why = weighted_adapter(ads, [1.0] * len(ads))
    if why:
        die(f"cannot merge the experts: {why}")
    domains = list(paths)
    data = read_traces(os.path.join(args.out_dir, "distill"), domains)
    per = math.ceil(args.examples / len(domains))
    rows = [r for group in zip(*(first_distinct(data[d], per) for d in domains)) for r in group][:args.examples]
    if not rows:
        die(f"no traces for {', '.join(domains)} in {os.path.join(args.out_dir, 'distill')}")
    batch = training_batch(enc, [encode_example(enc, r["prompt"], r["completion"]) for r in rows], args.device, True)
    model = copy.deepcopy(base).eval()
    objective = make_objective(model, ads, batch, args.l1)
    w, f, history = search(objective, len(ads), args.steps, args.seed)
    objective(w)  # the model holds the best merge again
    out_path = os.path.join(args.out_dir, "mor", "lorahub.pt")
    make_out_dir(os.path.dirname(out_path))
    weights = dict(zip(domains, map(float, w)))
    save_adapter(out_path, model, base_ckpt, method="lorahub", train_config=vars(args),
                 metrics={"weights": weights, "objective": f, "uniform_objective": history[0], "history": history,
                          "examples": len(rows), "train_seconds": timer()})
    print(f"lorahub: objective {history[0]:.4f} (uniform merge) -> {f:.4f} in {args.steps} evaluations | weights "
          + " ".join(f"{d} {x:+.2f}" for d, x in weights.items()))
    print(f"wrote {out_path} | total wall time {timer():.0f}s")


if __name__ == "__main__":
    main()
