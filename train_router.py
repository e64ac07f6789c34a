"""
Stage 2, step 2: train the router (and the small attention LoRA) over frozen experts.

The base and every expert OUT/experts/D.pt stay frozen; the model is base + experts + router
(router.compose). It learns from the union of the experts' verified traces OUT/distill/*.jsonl, with
next-token cross-entropy on completion tokens only. Each example of a batch first draws a domain
uniformly, then one of that domain's traces, so a domain with more traces does not dominate.
In a --mixed_frac share of the batches, each example joins two traces of two different domains into
one mixed example (both questions in the prompt, both verified answers in order): our addition to the
paper's recipe, so that the router and attention LoRA learn answers that switch experts mid-way
(--mixed_frac 0 trains on single-domain traces only, as the paper does).

    python train_router.py                                   # the method: hard top-1, writes OUT/mor/mor_hard.pt
    python train_router.py --routing soft --top_k 2           # soft baseline (mor_soft_top2)
    python train_router.py --routing soft --top_k 2 --per_layer true --train_experts true --name moe_soft
    python train_router.py --routing gumbel                  # Gumbel-softmax baseline (mor_gumbel)
--train_experts makes the experts' A/B trainable (at --expert_lr), pulled toward their starting values by
--l2 * sum ||theta - theta_0||^2 (the "relearn" baseline). --attn_lora_r 0 turns the attention LoRA off.

Two switches that decide what the numbers mean:
  --traces N     only the first N distinct traces of each domain (0: all). The paper's premise is that
                 stage-2 data is scarce; with plenty of it an attention LoRA alone relearns every task.
  --route_loss L adds L * mean over layers of CE(router logits, the domain of the token being written)
                 at every position (the MeteoRA-style routing loss, from the traces' domain labels).
                 This departs from the paper, whose router learns from the LM loss alone (--route_loss 0):
                 through the straight-through estimator the router is told only whether the chosen
                 expert should count more, never which other one would have been better, and the
                 attention LoRA, with its dense gradient, learns the tasks first.
  --decisive_weight W  counts a position of that routing loss 1 + W times where the expert decides:
                 an answer token the base alone would not write (its argmax on the same batch differs).
                 Those few positions are the ones a misrouted token costs accuracy; the other
                 positions of the answer and prompt outnumber them about 40 to 1.
  --attn_only    the control: the attention LoRA alone on the same traces, steps and rates, no experts
                 and no router; written as an adapter file OUT/mor/NAME.pt.
At the end: greedy accuracy on --eval_n test prompts per domain, next to each expert's own.
"""
import copy
import math
import os
import random

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import (Timer, autocast, die, encode_example, first_distinct, greedy_accuracy, load_base,
                    load_resume_state, make_out_dir, parse_args, peak_memory, per_rank, read_traces, save_atomic,
                    setup_ddp, training_batch)
from lora import ATTN_TARGETS, apply_adapter, attach, load_adapter, lora_parameters, save_adapter
from router import compose, count_parameters, expert_parameters, save_mor
from tasks import DOMAINS, SEP, join_mixed


def route_labels(enc, batch, seq, tgt, domains):
    """(R, C) the expert each position should route to: the domain of the question whose prompt or
    answer holds the token it writes (a mixed example: the first question's until the separator of the
    prompt, the second's after it; the first answer's until the separator of the answer, the second's
    from it on), as each expert ran on every position of its own domain when it was trained; -1 on
    padding. seq and tgt are training_batch's: sequence i's positions are those where seq == i, in order."""
    sep = enc.encode_ordinary(SEP.strip())[0]
    labels = torch.full_like(tgt, -1)
    for i, r in enumerate(batch):
        parts = [domains.index(d) for d in r["domain"].split("+")]
        lab = []
        for text, in_prompt in ((r["prompt"], True), (r["completion"], False)):
            ids = enc.encode_ordinary(text)
            # the first part ends before the answer's "|" (as eval's mixed purity splits), after the prompt's
            split = ids.index(sep) + in_prompt if len(parts) == 2 and sep in ids else len(ids)
            lab += [parts[0]] * split + [parts[-1]] * (len(ids) - split)
        lab.append(parts[-1])  # EOS; positions write tokens 1.. (BOS is never written)
        where = (seq == i).nonzero(as_tuple=True)
        n = len(lab)  # = the sequence's positions; unpacked rows also mark their padding with seq == i
        labels[where[0][:n], where[1][:n]] = torch.tensor(lab, device=tgt.device)
    return labels


@torch.no_grad()
def route_weights(base, idx, tgt, pos, mask, decisive_weight):
    """(R, C) each position's weight in the routing loss: 1, and 1 + decisive_weight where the expert
    decides, an answer token (tgt >= 0) that the base alone would not write (its argmax differs)."""
    weight = torch.ones(tgt.shape, device=tgt.device)
    if decisive_weight:
        base_next = base(idx, pos=pos, mask=mask)[0].argmax(-1)
        weight += decisive_weight * ((tgt >= 0) & (base_next != tgt))
    return weight


def router_batch(data, domains, n, mixed_frac, rng):
    """n training examples, each a trace of a uniformly drawn domain; or, for a mixed_frac share of
    batches, two traces of two different domains joined into one mixed example (each half verified and
    written by its own expert), so the router sees answers that must switch experts mid-way. Whole
    batches of one kind keep padding short."""
    if len(domains) > 1 and rng.random() < mixed_frac:
        return [join_mixed(*(rng.choice(data[d]) for d in rng.sample(domains, 2))) for _ in range(n)]
    return [rng.choice(data[rng.choice(domains)]) for _ in range(n)]


def default_name(args):
    if args.attn_only:
        return "attn_only"
    parts = ["moe" if args.train_experts else "mor", args.routing]
    if args.routing == "soft":
        parts.append(f"top{args.top_k}" + ("_norm" if args.normalize else ""))
    if args.per_layer:
        parts.append("per_layer")
    return "_".join(parts)


def expert_accuracy(path, base, base_ckpt, enc, domain, n):
    """The expert's own greedy accuracy: from its file when measured on the same n prompts, else measured."""
    ad = load_adapter(path, base_ckpt)
    metrics, cfg = ad["meta"].get("metrics") or {}, ad["meta"].get("train_config") or {}
    if "test_accuracy" in metrics and cfg.get("eval_n") == n:
        return metrics["test_accuracy"]
    model = copy.deepcopy(base)
    apply_adapter(model, ad)
    return greedy_accuracy(model, enc, domain, n)


def main():
    def extra(p):
        p.add_argument("--name", default=None, rule="text", help="output OUT/mor/NAME.pt (default: mor_hard, or derived from the flags)")
        p.add_argument("--domains", default=",".join(DOMAINS), rule="list " + "|".join(DOMAINS), help="experts to compose, comma-separated (default: all)")
    args = parse_args(__doc__, ["router"], extra)
    rank, world, args.device = setup_ddp(args.device)
    batch_size = per_rank(args.batch_size, world, "batch_size")
    timer = Timer()
    domains = args.domains.split(",")
    if len(set(domains)) != len(domains):
        die(f"--domains names an expert twice: {args.domains}")
    args.name = args.name or default_name(args)
    expert_files = [os.path.join(args.out_dir, "experts", f"{d}.pt") for d in domains]
    for d, f in zip(domains, expert_files):
        if not os.path.exists(f):
            die(f"no expert for domain {d}: {f} not found (run train_expert.py --domain {d} first)")
    out_path = os.path.join(args.out_dir, "mor", f"{args.name}.pt")
    make_out_dir(os.path.dirname(out_path))
    if args.attn_only and args.attn_lora_r == 0:
        die("--attn_only trains the attention LoRA alone: it needs --attn_lora_r of at least 1")
    if args.route_loss and (args.attn_only or args.routing not in ("hard", "gumbel")):
        # the presets set it for the method; the soft baselines and the control train as the paper's do
        print(f"--route_loss {args.route_loss} is for the hard router: not used for this "
              f"{'attention LoRA alone' if args.attn_only else 'soft router'}")
        args.route_loss = 0.0
    data = read_traces(os.path.join(args.out_dir, "distill"), domains)
    for d in domains:
        n_all = len(data[d])
        data[d] = first_distinct(data[d], args.traces)
        print(f"traces {d:5s} | {len(data[d])} of {n_all}" + ("  (none: this domain is not trained on)" if not data[d] else ""))
    train_domains = [d for d in domains if data[d]]
    if not train_domains:
        die(f"no usable traces for {', '.join(domains)} in {os.path.join(args.out_dir, 'distill')}")

    torch.manual_seed(args.seed)
    base, enc, base_ckpt = load_base(args.out_dir, args.device)
    if args.attn_only:  # the control: no experts, no router
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(False)
        attach(model, ATTN_TARGETS, args.attn_lora_r, args.attn_alpha)
    else:
        model = compose(copy.deepcopy(base), base_ckpt, expert_files, routing=args.routing, top_k=args.top_k,
                        normalize=args.normalize, per_layer=args.per_layer, attn_lora_r=args.attn_lora_r,
                        attn_alpha=args.attn_alpha, train_experts=args.train_experts)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train, n_total = count_parameters(model)
    print(f"{args.name}: " + ("attention LoRA alone, no experts" if args.attn_only else
          f"{len(domains)} experts, routing {args.routing} top-{args.top_k}"
          f"{' normalized' if args.normalize else ''}{' per-layer' if args.per_layer else ' shared'}"
          f"{f', routing loss {args.route_loss}' if args.route_loss else ''}") +
          f" | trainable {n_train:,} of {n_total:,} parameters ({n_train / n_total:.2%})")
    experts0 = [p.detach().clone() for p in expert_parameters(model)] if args.train_experts else []
    # three rates: the router --lr, the attention LoRA --attn_lr, the experts' own weights --expert_lr
    # (only the relearn baseline trains them)
    attn = {id(p) for p in lora_parameters(model)}
    experts = {id(p) for p in expert_parameters(model)} if args.train_experts else set()
    own_rate = attn | experts
    groups = [{"params": [p for p in params if id(p) not in own_rate], "base_lr": args.lr},
              {"params": [p for p in params if id(p) in attn], "base_lr": args.attn_lr},
              {"params": [p for p in params if id(p) in experts], "base_lr": args.expert_lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    # under torchrun DDP averages the router's (and attention LoRA's) gradients over ranks in backward
    train_model = DDP(model) if world > 1 else model
    rng = random.Random(args.seed + rank)  # each rank its own batches
    state_path = out_path[:-len(".pt")] + ".ckpt.pt"
    inputs = [base_ckpt["fingerprint"]] + ([] if args.attn_only else [x["fingerprint"] for x in model.router.expert_info])
    state = load_resume_state(state_path, args, keys=("params", "opt", "rng", "torch_rng", "losses", "inputs"))
    if state and state["inputs"] != inputs:
        die(f"{state_path} was trained on another base or other experts; rerun without --resume")
    losses, start = [], 0
    if state:
        with torch.no_grad():
            for p, t in zip(params, state["params"]):
                p.copy_(t)
        opt.load_state_dict(state["opt"])
        if rank == 0:  # the checkpoint holds rank 0's streams; other ranks start theirs afresh
            rng.setstate(state["rng"])
            torch.set_rng_state(state["torch_rng"])
        losses, start = state["losses"], state["step"]
    t0 = timer()
    every = max(1, args.steps // 10)
    bar = tqdm(range(start + 1, args.steps + 1), desc=args.name, dynamic_ncols=True, leave=False, initial=start,
               total=args.steps, disable=rank > 0 or None)  # None: a bar only on a terminal
    model.train()
    for step in bar:
        batch = router_batch(data, train_domains, batch_size, args.mixed_frac, rng)
        seqs = [encode_example(enc, r["prompt"], r["completion"]) for r in batch]
        idx, tgt, pos, mask, seq = training_batch(enc, seqs, args.device, args.pack)
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.steps))  # cosine to a tenth
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * decay
        if not args.attn_only:
            model.router.tau = decay  # gumbel routing's temperature: the same cosine, from 1 to 0.1
        if args.route_loss:
            model.router.keep_logits, model.router.kept = True, []
        with autocast(args):
            _, loss = train_model(idx, tgt, pos=pos, mask=mask)
        ce = loss.item()
        if args.route_loss:  # the departure from the paper: tell the router which expert writes each token
            want = route_labels(enc, batch, seq, tgt, domains).view(-1)
            at = want >= 0
            weight = route_weights(base, idx, tgt, pos, mask, args.decisive_weight).view(-1)[at]
            weight = weight / weight.sum()
            route_ce = sum((F.cross_entropy(z[at], want[at], reduction="none") * weight).sum()
                           for z in model.router.kept) / len(model.router.kept)
            model.router.keep_logits, model.router.kept = False, []
            loss = loss + args.route_loss * route_ce
        if not math.isfinite(ce):  # stop before the bad step touches the weights; the last checkpoint stays
            die(f"loss became {ce} at step {step}; lower --lr (last good checkpoint: {state_path})")
        if experts0:  # relearn baseline: experts may move, at a price
            loss = loss + args.l2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(expert_parameters(model), experts0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(ce)
        bar.set_postfix(loss=f"{ce:.3f}")
        if step % every == 0 or step == args.steps:
            mean = sum(losses[-every:]) / len(losses[-every:])
            tqdm.write(f"step {step}/{args.steps} | loss {mean:.4f} | lr {args.lr * decay:.2e}")
        if rank == 0 and args.ckpt_every and step % args.ckpt_every == 0 and step < args.steps:
            save_atomic({"params": [p.detach().cpu() for p in params], "opt": opt.state_dict(), "rng": rng.getstate(),
                         "torch_rng": torch.get_rng_state(), "losses": losses, "step": step, "config": vars(args),
                         "inputs": inputs}, state_path)
    train_s = timer() - t0
    if world > 1:
        dist.barrier()  # every rank done with gloo before any tears it down (an abort under load otherwise)
        dist.destroy_process_group()
        if rank > 0:  # rank 0 alone evaluates and writes
            return

    # quick check: does the composition keep each expert's own-domain accuracy?
    acc, expert_acc = {}, {}
    for d, f in zip(domains, expert_files):
        acc[d] = greedy_accuracy(model, enc, d, args.eval_n)
        expert_acc[d] = expert_accuracy(f, base, base_ckpt, enc, d, args.eval_n)
        line = f"{args.name} {d:5s} | greedy acc {acc[d]:.2f} | expert alone {expert_acc[d]:.2f}"
        if expert_acc[d] > 0:  # the target: at least 95% of the expert's own accuracy
            ratio = acc[d] / expert_acc[d]
            line += f" | ratio {ratio:.2f}" + ("" if ratio >= 0.95 else "  (below the 0.95 target)")
        print(line)
    save = save_adapter if args.attn_only else save_mor
    save(out_path, model, base_ckpt, name=args.name, train_config=vars(args),
         metrics={"loss": losses, "accuracy": acc, "expert_accuracy": expert_acc, "trainable_params": n_train,
                  "total_params": n_total, "traces": {d: len(data[d]) for d in domains}, "train_seconds": train_s})
    if os.path.exists(state_path):
        os.remove(state_path)  # the finished router supersedes it
    print(f"wrote {out_path} | trained {args.steps} steps in {train_s:.0f}s | total wall time {timer():.0f}s"
          + peak_memory(args.device))


if __name__ == "__main__":
    main()
