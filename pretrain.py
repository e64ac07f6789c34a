"""
Pretrain the base model: a generic, fluent but unreliable reasoner.

It sees every domain's format, and mixed two-question prompts, but a share (--bug_rate) of its
training traces come from each domain's buggy solver (tasks.py). Greedy decoding then tends to
follow the bug while sampling still finds correct traces: the signal RLVF needs in stage 1.

    python pretrain.py                    # cpu preset: 4-6 minutes on 2 cores
    python pretrain.py --preset smoke     # seconds
    python pretrain.py --optimizer muon   # Muon for the blocks' matrices (docs/experiments.md)
Writes OUT/base.pt: weights, model config, tokenizer, task fingerprint, training config, fingerprint,
metrics.
"""
import math
import os
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import (Timer, autocast, die, encode_example, fingerprint, generate_text, load_resume_state,
                    make_out_dir, parse_args, peak_memory, per_rank, save_atomic, setup_ddp, training_batch)
from model import GPT, GPTConfig
from tasks import (DOMAINS, MAX_NEW_TOKENS, MAX_NEW_TOKENS_MIXED, examples, get_tokenizer, mixed_examples,
                   sample, sample_mixed, score, stream_rng, tasks_fingerprint, tokenizer_info)


def pretrain_batch(rng, n, bug_rate, mixed_frac):
    """n training examples: single questions of random domains, or (a mixed_frac share of batches)
    mixed two-question prompts. Whole batches of one kind keep padding short."""
    if rng.random() < mixed_frac:
        return [sample_mixed(*rng.sample(DOMAINS, 2), "train", rng, bug_rate) for _ in range(n)]
    return [sample(rng.choice(DOMAINS), "train", rng, bug_rate) for _ in range(n)]


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, per GPU, from the data sheets


def peak_flops(device):
    """The GPU's peak bf16 FLOP/s when we know it (MFU is printed against it), else None."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for gpu, f in PEAK_FLOPS.items() if gpu in name), None)


def flops_per_token(config, n_params, T):
    """Training FLOPs per token: 6 per weight outside the embedding (forward 2, backward 4) plus
    attention's scores and weighted sum over T positions (12 per layer per channel per position)."""
    return 6 * n_params + 12 * config.n_layer * config.n_embd * T


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def evaluate(model, enc, n, pass_k, seed=0):
    """Greedy accuracy per domain and on mixed prompts, and pass@k with temperature-1 samples."""
    model.eval()
    acc, pass_at = {}, {}
    g = torch.Generator(device=model.wte.weight.device).manual_seed(seed)
    for d in DOMAINS:
        exs = examples(d, "test", n)
        prompts = [e["prompt"] for e in exs]
        outs = generate_text(model, enc, prompts, MAX_NEW_TOKENS)
        acc[d] = sum(score(e, o) for e, o in zip(exs, outs)) / n
        if pass_k:
            samples = generate_text(model, enc, [p for p in prompts for _ in range(pass_k)], MAX_NEW_TOKENS,
                                    temperature=1.0, generator=g)
            hits = [max(score(e, s) for s in samples[i * pass_k:(i + 1) * pass_k]) for i, e in enumerate(exs)]
            pass_at[d] = sum(hits) / n
    exs = mixed_examples("test", n)
    outs = generate_text(model, enc, [e["prompt"] for e in exs], MAX_NEW_TOKENS_MIXED)
    acc["mixed"] = sum(score(e, o) for e, o in zip(exs, outs)) / n
    return acc, pass_at


def optimizers(model, args):
    """AdamW for every weight; or (--optimizer muon) torch.optim.Muon, the modded-nanogpt speedrun's
    optimizer (momentum orthogonalized by a Newton-Schulz iteration), for the blocks' weight matrices
    and AdamW for the rest (embedding, head, norms). Muon's step is scaled to match AdamW's update size
    (adjust_lr_fn), so --lr and its schedule mean the same for both."""
    fused = args.device.startswith("cuda")
    adamw = lambda params: torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01, fused=fused)
    if args.optimizer == "adamw":
        return [adamw(model.parameters())]
    is_matrix = lambda name, p: name.startswith("blocks.") and p.ndim == 2
    return [torch.optim.Muon([p for n, p in model.named_parameters() if is_matrix(n, p)], lr=args.lr,
                             weight_decay=0.01, adjust_lr_fn="match_rms_adamw"),
            adamw([p for n, p in model.named_parameters() if not is_matrix(n, p)])]


def main():
    args = parse_args(__doc__, ["model", "pretrain"])
    rank, world, args.device = setup_ddp(args.device)
    batch_size = per_rank(args.batch_size, world, "batch_size")
    make_out_dir(args.out_dir)
    torch.manual_seed(args.seed)
    enc = get_tokenizer()
    config = GPTConfig(vocab_size=enc.n_vocab, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       block_size=args.block_size)
    model = GPT(config).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"base model: {n_params / 1e6:.2f}M parameters, {config}")
    opts = optimizers(model, args)
    ddp = DDP(model) if world > 1 else model  # under torchrun: gradients averaged over ranks in backward
    step_fn = torch.compile(ddp) if args.compile else ddp
    rng = stream_rng("pretrain", "train", args.seed + rank)  # each rank its own data
    state_path = os.path.join(args.out_dir, "pretrain.ckpt.pt")
    losses, start = [], 0
    state = load_resume_state(state_path, args, keys=("model", "opt", "rng", "torch_rng", "losses"))
    tasks = tasks_fingerprint()  # the data: a state written before tasks.py changed would train on a mix
    if state and state.get("tasks", tasks) != tasks:
        die(f"{state_path} was trained on other task definitions (tasks.py has changed since); rerun without --resume")
    if state:
        model.load_state_dict(state["model"])
        for opt, opt_state in zip(opts, state["opt"]):
            opt.load_state_dict(opt_state)
        if rank == 0:  # the checkpoint holds rank 0's streams; other ranks start theirs afresh
            rng.setstate(state["rng"])
            torch.set_rng_state(state["torch_rng"])
        losses, start = state["losses"], state["step"]
    peak = peak_flops(args.device)
    n_matmul = n_params - model.wte.weight.numel()
    flops, timer = [], Timer()

    def next_batch():
        seqs = [encode_example(enc, e["prompt"], e["completion"])
                for e in pretrain_batch(rng, batch_size, args.bug_rate, args.mixed_frac)]
        longest = max(len(ids) for ids, _ in seqs)
        if longest - 1 > config.block_size:
            die(f"a training sequence of {longest} tokens does not fit the model's context "
                f"(--block_size {config.block_size})")
        return seqs, training_batch(enc, seqs, args.device, args.pack)

    data_state = rng.getstate()  # where the next step's batch is drawn from: what a checkpoint saves
    batch = next_batch() if start < args.steps else None
    bar = tqdm(range(start, args.steps), desc="pretrain", dynamic_ncols=True, initial=start, total=args.steps,
               disable=rank > 0 or None)  # None: a bar only on a terminal, so an error stays the one line of a log
    for step in bar:
        seqs, (idx, tgt, pos, mask, _) = batch
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args)
        with autocast(args):
            _, loss = step_fn(idx, tgt, pos=pos, mask=mask)
        loss.backward()
        if step + 1 < args.steps:  # on a GPU the next batch is built while this step's kernels run
            data_state = rng.getstate()
            batch = next_batch()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not torch.isfinite(grad_norm):  # stop before the bad step touches the weights; the last checkpoint stays
            die(f"training diverged at step {step} (loss {loss.item():.4g}, gradient norm {grad_norm.item()}); "
                f"lower --lr (last good checkpoint: {state_path})")
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        n_tokens = sum(len(ids) - 1 for ids, _ in seqs)  # real ones: padding is not useful work
        flops.append((timer(), flops_per_token(config, n_matmul, idx.size(1)) * n_tokens))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if rank == 0 and args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            save_atomic({"model": model.state_dict(), "opt": [opt.state_dict() for opt in opts], "rng": data_state,
                         "torch_rng": torch.get_rng_state(), "losses": losses, "step": step + 1,
                         "config": vars(args), "tasks": tasks}, state_path)
    train_s = timer()
    done = flops[min(10, len(flops) // 2):]  # after the first steps (compilation, warm-up)
    rate = sum(f for _, f in done[1:]) / max(1e-9, done[-1][0] - done[0][0]) if len(done) > 1 else 0.0
    if world > 1:
        dist.barrier()  # every rank done with gloo before any tears it down (an abort under load otherwise)
        dist.destroy_process_group()
        if rank > 0:  # rank 0 alone evaluates and writes
            return
    print(f"trained {args.steps} steps in {train_s:.0f}s | loss {sum(losses[:10]) / min(10, len(losses)):.3f} "
          f"-> {sum(losses[-10:]) / min(10, len(losses)):.3f} | {rate / 1e12:.3f} TFLOP/s"
          + (f" | MFU {rate / peak:.1%} of {torch.cuda.get_device_name(args.device)}" if peak else ""))

    acc, pass_at = evaluate(model, enc, args.eval_n, args.pass_k, args.seed)
    for d in DOMAINS:
        extra = f" | pass@{args.pass_k} {pass_at[d]:.2f}" if args.pass_k else ""
        print(f"base {d:5s} | greedy {acc[d]:.2f}{extra}")
    print(f"base mixed | greedy {acc['mixed']:.2f}")
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    save_atomic({"model": state, "model_config": asdict(config), "tokenizer": tokenizer_info(enc),
                 "tasks": tasks, "train_config": vars(args), "fingerprint": fingerprint(state),
                 "metrics": {"loss": losses, "accuracy": acc, f"pass@{args.pass_k}": pass_at,
                             "train_seconds": train_s}},
                os.path.join(args.out_dir, "base.pt"))
    if os.path.exists(state_path):
        os.remove(state_path)  # the finished base.pt supersedes it
    print(f"wrote {os.path.join(args.out_dir, 'base.pt')} | total wall time {timer():.0f}s" + peak_memory(args.device))


if __name__ == "__main__":
    main()
