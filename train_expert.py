"""
Stage 1: train one domain's LoRA expert on the frozen base, on that domain's `train` stream only.

--method rl (default): reinforcement learning from verifiable feedback, GRPO-style. Plainly, with
the defaults this is REINFORCE with a group baseline:
    for each of P prompts, sample G completions at temperature 1 with the KV-cache generator;
    reward r = the domain's verifier (1 or 0); advantage a = r - mean(r of the same prompt's group)
    (divided by the group's std with --std_norm);
    loss = -sum over completion tokens of a * log p(token), divided by the number of completion
    tokens in the batch (prompt and padding masked); one gradient step per batch.
A group whose rewards are all equal has zero advantage and teaches nothing (its rollouts are left
out of the update's forward and backward pass). Optional, off by default: --clip > 0 uses PPO's
clipped ratio against the sampling policy for --ppo_epochs passes, and --kl > 0 adds a KL penalty
(k3 estimator) to the adapter-off model, the base. --stop_reward R ends training early once the
sampled reward averages R or more over the last 5 steps: the task is solved, and the steps left would
be groups with nothing to teach.

--method sft: the same LoRA trained on gold traces with completion-only cross-entropy, the
"traditional fine-tuning" expert the paper compares against.

    python train_expert.py --domain add                 # writes OUT/experts/add.pt
    python train_expert.py --domain add --method sft    # writes OUT/experts/add_sft.pt
"""
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import (Timer, autocast, die, encode_example, greedy_accuracy, load_base,
                    load_resume_state, make_out_dir, parse_args, peak_memory, per_rank, save_atomic, setup_ddp,
                    training_batch)
from lora import EXPERT_TARGETS, adapters_off, attach, lora_parameters, save_adapter
from tasks import DOMAINS, MAX_NEW_TOKENS, sample, stream_rng, verify


def token_logprobs(model, idx, tgt, pos=None, mask=None):
    """log p(target) at every position (0 where the target is masked)."""
    logits, _ = model(idx, pos=pos, mask=mask)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * (tgt != -1)


def rollouts(model, enc, batch, group, temperature, generator):
    """G sampled completions for each prompt: token lists (with EOS when the row ended) and rewards."""
    eos, pad = enc.encode_single_token("<|eos|>"), enc.encode_single_token("<|pad|>")
    unique = [encode_example(enc, ex["prompt"])[0] for ex in batch]
    comps = model.generate(unique, MAX_NEW_TOKENS, eos, pad, temperature=temperature, generator=generator,
                           n_samples=group)
    prompts = [p for p in unique for _ in range(group)]
    rewards = [verify(enc.decode([t for t in c if t != eos]), ex["answer"])
               for ex, c in zip([ex for ex in batch for _ in range(group)], comps)]
    return prompts, comps, torch.tensor(rewards)


def group_advantages(rewards, group, std_norm=False):
    r = rewards.view(-1, group)
    adv = r - r.mean(1, keepdim=True)
    if std_norm:
        adv = adv / (r.std(1, keepdim=True) + 1e-6)
    return adv.view(-1)


def policy_loss(model, idx, tgt, adv, pos=None, mask=None, old_logp=None, clip=0.0, kl=0.0, n_counted=None):
    """Token-level policy gradient over completion tokens, summed and divided by their count (or by
    n_counted, the whole batch's count, when idx is one chunk of it). adv is one advantage per row
    (B,) or per token (B, T) (packed rows hold several rollouts)."""
    adv = adv[:, None] if adv.dim() == 1 else adv
    logp = token_logprobs(model, idx, tgt, pos, mask)
    if clip > 0:
        ratio = torch.exp(logp - old_logp)
        per_tok = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    else:
        per_tok = -adv * logp
    if kl > 0:
        with torch.no_grad(), adapters_off(model):
            ref = token_logprobs(model, idx, tgt, pos, mask)
        per_tok = per_tok + kl * (torch.exp(ref - logp) - (ref - logp) - 1)
    counted = (tgt != -1).float()
    return (per_tok * counted).sum() / (counted.sum().clamp(min=1) if n_counted is None else n_counted)


def rl_step(model, enc, opt, batch, args, generator, train_model=None):
    """train_model: the model the loss goes through (under torchrun the DDP wrapper); sampling uses
    the bare model."""
    model.eval()  # sampling: no dropout
    prompts, comps, rewards = rollouts(model, enc, batch, args.group, args.temperature, generator)
    adv = group_advantages(rewards, args.group, args.std_norm).to(args.device)
    # A rollout with zero advantage (its whole group equally right or wrong) adds exactly nothing to
    # the loss or its gradient unless --kl is on, so the update's forward and backward pass skip it;
    # the loss is still divided by the whole batch's completion tokens. As the expert improves most
    # groups are all right, and most of the update goes. (Under torchrun every rank keeps all rows:
    # DDP needs the same number of backward passes on each. One row is kept when none would be, so
    # that AdamW still takes its step on a zero gradient.)
    n_counted = torch.tensor(max(1, sum(len(c) for c in comps)), device=args.device)
    every_row = args.kl > 0 or isinstance(train_model, DDP)
    keep = list(range(len(comps))) if every_row else adv.nonzero().flatten().tolist() or [0]
    idx, tgt, pos, mask, seq = training_batch(enc, [(prompts[i] + comps[i], len(prompts[i])) for i in keep],
                                              args.device, args.pack)
    adv = adv[keep][seq.clamp(min=0)]  # each token gets its rollout's advantage
    old_logp = None
    if args.clip > 0:
        with torch.no_grad():
            old_logp = token_logprobs(model, idx, tgt, pos, mask)
    model.train()
    # --micro_batch rows per backward pass: the gradient of the whole batch, summed over chunks, in a
    # fraction of the activation memory (0: all rows at once). Under torchrun each chunk's backward
    # averages over ranks: the same gradient, more communication.
    rows = args.micro_batch or len(idx)
    for _ in range(max(1, args.ppo_epochs)):
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for i in range(0, len(idx), rows):
            part = [t[i:i + rows] if t is not None else None for t in (idx, tgt, adv, pos, mask, old_logp)]
            with autocast(args):
                chunk_loss = policy_loss(train_model or model, *part, clip=args.clip, kl=args.kl, n_counted=n_counted)
            chunk_loss.backward()
            loss = loss + chunk_loss.detach()
        opt.step()
    groups = rewards.view(-1, args.group)
    return {"loss": loss.item(), "reward": rewards.mean().item(), "pass": (groups.max(1).values > 0).float().mean().item(),
            "len": sum(len(c) for c in comps) / len(comps)}


def sft_step(model, enc, opt, batch, args):
    model.train()
    seqs = [encode_example(enc, ex["prompt"], ex["completion"]) for ex in batch]
    idx, tgt, pos, mask, _ = training_batch(enc, seqs, args.device, args.pack)
    with autocast(args):
        _, loss = model(idx, tgt, pos=pos, mask=mask)  # model: under torchrun, the DDP wrapper
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss.item()}


def base_accuracy(model, enc, base_ckpt, domain, n):
    """Step 0's held-out accuracy: the base's own (an expert starts as the base, its B zero), from
    base.pt when pretraining measured it on the same n test prompts, else measured."""
    measured = (base_ckpt.get("metrics") or {}).get("accuracy") or {}
    if (base_ckpt.get("train_config") or {}).get("eval_n") == n and domain in measured:
        return measured[domain]
    return greedy_accuracy(model, enc, domain, n)


STOP_WINDOW = 5  # --stop_reward looks at the mean reward of this many last steps


def reward_reached(curve, stop_reward, device, world):
    """--stop_reward: has the sampled reward of the last STOP_WINDOW steps reached it on average? Once
    nearly every rollout is right, nearly every group has zero advantage and the steps teach next to
    nothing (on cpu, add and bool get there in 30-40 steps; ok and pick never). Under torchrun every
    rank must stop at the same step: the slowest rank's view decides."""
    if not stop_reward or len(curve) < STOP_WINDOW:
        return False
    reached = torch.tensor(float(sum(c["reward"] for c in curve[-STOP_WINDOW:]) / STOP_WINDOW >= stop_reward),
                           device=device)
    if world > 1:
        dist.all_reduce(reached, op=dist.ReduceOp.MIN)
    return bool(reached.item())


def main():
    def extra(p):
        p.add_argument("--domain", required=True, rule="|".join(DOMAINS))
        p.add_argument("--method", default="rl", rule="rl|sft", help="RLVF or supervised on gold traces")
    args = parse_args(__doc__, ["expert"], extra)
    if args.method == "sft":  # SFT on gold traces converges in fewer steps than RLVF (--sft_steps)
        args.steps = args.sft_steps
    rank, world, args.device = setup_ddp(args.device)
    n = per_rank(args.prompts, world, "prompts") if args.method == "rl" else per_rank(args.sft_batch, world, "sft_batch")
    out_path = os.path.join(args.out_dir, "experts", f"{args.domain}{'_sft' if args.method == 'sft' else ''}.pt")
    make_out_dir(os.path.dirname(out_path))
    model, enc, base_ckpt = load_base(args.out_dir, args.device)
    torch.manual_seed(args.seed)
    attach(model, EXPERT_TARGETS, args.rank, args.alpha)
    params = lora_parameters(model)
    print(f"{args.method} expert for {args.domain}: {sum(p.numel() for p in params):,} trainable parameters "
          f"(LoRA r={args.rank} on {', '.join(EXPERT_TARGETS)})")
    lr = args.lr if args.method == "rl" else args.sft_lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # under torchrun DDP averages the LoRA gradients over ranks in backward (the frozen base is not synced)
    train_model = DDP(model) if world > 1 else model
    rng = stream_rng(args.domain, "train", args.seed + rank)  # each rank its own prompts and rollouts
    gen = torch.Generator(device=args.device).manual_seed(args.seed + rank)
    timer = Timer()
    state_path = out_path[:-len(".pt")] + ".ckpt.pt"
    state = load_resume_state(state_path, args, keys=("lora", "opt", "rng", "gen", "curve", "evals", "base"))
    if state and state["base"] != base_ckpt["fingerprint"]:
        die(f"{state_path} was trained on another base model; rerun without --resume")
    if state:
        with torch.no_grad():
            for p, t in zip(params, state["lora"]):
                p.copy_(t)
        opt.load_state_dict(state["opt"])
        if rank == 0:  # the checkpoint holds rank 0's streams; other ranks start theirs afresh
            rng.setstate(state["rng"])
            gen.set_state(state["gen"])
        curve, evals, start = state["curve"], state["evals"], state["step"]
    else:
        curve, evals, start = [], [], 0
        if rank == 0:  # rank 0 alone evaluates
            evals.append((0, base_accuracy(model, enc, base_ckpt, args.domain, args.eval_n)))
            print(f"step 0/{args.steps} | greedy acc {evals[0][1]:.2f} (held-out)")
    bar = tqdm(range(start + 1, args.steps + 1), desc=f"{args.method}:{args.domain}", dynamic_ncols=True,
               leave=False, initial=start, total=args.steps,
               disable=rank > 0 or None)  # None: a bar only on a terminal, so an error stays the one line of a log
    for step in bar:
        batch = [sample(args.domain, "train", rng) for _ in range(n)]
        if args.method == "rl":
            stats = rl_step(model, enc, opt, batch, args, gen, train_model)
        else:
            stats = sft_step(train_model, enc, opt, batch, args)
        if not torch.isfinite(torch.tensor(stats["loss"])):
            die(f"loss became {stats['loss']} at step {step}; lower --lr (last good checkpoint: {state_path})")
        curve.append(stats)
        if args.method == "rl":
            line = (f"step {step}/{args.steps} | reward {stats['reward']:.2f} | pass@{args.group} {stats['pass']:.2f}"
                    f" | len {stats['len']:.0f} | lr {lr:g}")
        else:
            line = f"step {step}/{args.steps} | loss {stats['loss']:.3f} | lr {lr:g}"
        solved = args.method == "rl" and reward_reached(curve, args.stop_reward, args.device, world)
        if rank == 0 and (args.eval_every and step % args.eval_every == 0 or step == args.steps or solved):
            evals.append((step, greedy_accuracy(model, enc, args.domain, args.eval_n)))
            line += f" | greedy acc {evals[-1][1]:.2f}"
        tqdm.write(line + (f" | stopped: mean reward of the last {STOP_WINDOW} steps >= {args.stop_reward}"
                           if solved else ""))
        if solved:  # done: no checkpoint to write, the expert file comes next
            break
        if rank == 0 and args.ckpt_every and step % args.ckpt_every == 0 and step < args.steps:
            save_atomic({"lora": [p.detach().cpu() for p in params], "opt": opt.state_dict(), "rng": rng.getstate(),
                         "gen": gen.get_state(), "curve": curve, "evals": evals, "step": step, "config": vars(args),
                         "base": base_ckpt["fingerprint"]},
                        state_path)
    train_s = timer()
    if world > 1:
        dist.barrier()  # every rank done with gloo before any tears it down (an abort under load otherwise)
        dist.destroy_process_group()
        if rank > 0:  # rank 0 alone evaluates and writes
            return
    acc = {args.domain: evals[-1][1]}  # on the other domains: eval.py's tables
    start_acc = evals[0][1]
    print(f"{args.method} expert {args.domain}: own-domain greedy acc {start_acc:.2f} -> {acc[args.domain]:.2f} "
          f"in {len(curve)} steps, {train_s:.0f}s")
    save_adapter(out_path, model, base_ckpt, domain=args.domain, method=args.method, train_config=vars(args),
                 metrics={"curve": curve, "evals": evals, "accuracy": acc, "test_accuracy": acc[args.domain],
                          "base_accuracy": start_acc, "train_seconds": train_s})
    if os.path.exists(state_path):
        os.remove(state_path)  # the finished expert supersedes it
    print(f"wrote {out_path} | total wall time {timer():.0f}s" + peak_memory(args.device))


if __name__ == "__main__":
    main()
