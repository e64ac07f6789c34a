"""
What every script shares: the presets, flag parsing, clear errors, atomic checkpoints, the base
model loader and text generation. Kept small on purpose; the method lives in the other files.
"""
import argparse
import contextlib
import glob
import hashlib
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, GPTConfig
from tasks import DOMAINS, MAX_NEW_TOKENS, examples, get_tokenizer, score, tasks_fingerprint, tokenizer_info

# Every hyperparameter of every stage, per preset. Each key becomes a --flag of the script that
# reads its section, so any of them can be overridden from the command line.
PRESETS = {
    "smoke": {
        "model": dict(n_layer=2, n_head=2, n_embd=32, block_size=256),
        "pretrain": dict(steps=30, batch_size=16, lr=3e-3, warmup=5, bug_rate=0.6, mixed_frac=0.15,
                         eval_n=8, pass_k=4, seed=0, compile=False, bf16=False, pack=True, optimizer="adamw",
                         ckpt_every=10),
        "expert": dict(steps=3, prompts=4, group=8, lr=3e-3, sft_steps=3, sft_lr=3e-3, rank=4, alpha=8.0, temperature=1.0,
                       std_norm=False, clip=0.0, ppo_epochs=1, kl=0.0, micro_batch=0, sft_batch=16, eval_every=2, stop_reward=0.0,
                       eval_n=8, seed=0, pack=True, ckpt_every=2),
        "distill": dict(n_prompts=8, samples=2, temperature=1.0, seed=0, gold_fallback=True),
        "router": dict(steps=10, batch_size=16, lr=3e-3, attn_lr=3e-3, expert_lr=3e-3, attn_lora_r=4, attn_alpha=8.0,
                       routing="hard", top_k=1, normalize=False, per_layer=False, train_experts=False, l2=1.0,
                       attn_only=False, traces=0, route_loss=1.0, decisive_weight=100.0,
                       mixed_frac=0.25, eval_n=8, seed=0, pack=True, ckpt_every=5),
        "lorahub": dict(steps=10, examples=16, l1=0.05, seed=0),
        "eval": dict(n_test=8, n_kl=8, n_route=6, n_cls=16, batch_size=64, seed=0),
    },
    "cpu": {
        "model": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
        # Muon, 600 steps: a lower loss than AdamW's 1,200 steps (0.036 against 0.057, seed 0) in half the
        # time; AdamW at 600 steps, even at twice the rate, leaves add unlearned (pass@8 0.09; docs/experiments.md).
        # mixed_frac 0.3: at 0.15 the experts, applied token by token inside a mixed prompt, got ok and hop
        # wrong there however well they were routed (diagnose.py mixed); the base is what reads the context
        "pretrain": dict(steps=600, batch_size=64, lr=3e-3, warmup=50, bug_rate=0.6, mixed_frac=0.3,
                         eval_n=50, pass_k=8, seed=0, compile=False, bf16=False, pack=True, optimizer="muon",
                         ckpt_every=100),
        # RLVF 80 steps of 12 prompts: the rollouts of 60 steps of 16, in more, smaller updates. pick learns
        # slowest: 60 of 16 left it +25 points over the base in one seed of three, 80 of 12 +31 or more; add
        # and bool are solved by step 50 and stop_reward ends them there; SFT's loss is under 0.02 by step 20
        # (docs/experiments.md). eval_n as the router's: its end-of-training check reads each expert's
        # accuracy from the expert's file instead of measuring it again
        "expert": dict(steps=80, prompts=12, group=8, lr=1e-3, sft_steps=20, sft_lr=3e-3, rank=8, alpha=16.0, temperature=1.0,
                       std_norm=False, clip=0.0, ppo_epochs=1, kl=0.0, micro_batch=0, sft_batch=64, eval_every=0,
                       stop_reward=0.98, eval_n=50, seed=0, pack=True, ckpt_every=20),
        # 500 prompts: stage 2 takes the first 64 traces of each domain, sweep.py up to 256
        "distill": dict(n_prompts=500, samples=0, temperature=1.0, seed=0, gold_fallback=False),
        # stage 2 as data-scarce as the paper's premise (64 traces per domain), the router told which expert
        # writes each token (route_loss; 0 is the paper's LM loss alone), the attention LoRA slow (1e-4):
        # faster, it relearns the tasks from the traces (attn_fast, README). The router itself at 3e-1: at
        # 1e-1 its 100 steps left some of hop's fact lookups misrouted in one seed of three (docs/experiments.md).
        # decisive_weight: the routing loss counts 101 times the answer tokens the base alone gets wrong; at 1
        # those few tokens were the misrouted ones, and two seeds of three kept under 95% of an expert.
        # 50 steps of 64 traces per domain: a router told where to route settles in that (the same accuracies
        # as 100 steps, seed 0); with 32, hop's fact lookups absent from the traces were the misrouted tokens
        # (diagnose.py lost), and some seeds kept under 95% of the hop expert (docs/experiments.md)
        "router": dict(steps=50, batch_size=32, lr=3e-1, attn_lr=1e-4, expert_lr=1e-2, attn_lora_r=4, attn_alpha=8.0,
                       routing="hard", top_k=1, normalize=False, per_layer=False, train_experts=False, l2=1.0,
                       attn_only=False, traces=64, route_loss=1.0, decisive_weight=100.0,
                       mixed_frac=0.25, eval_n=50, seed=0, pack=True, ckpt_every=25),
        "lorahub": dict(steps=40, examples=128, l1=0.05, seed=0),
        # 150 test prompts per domain: eval is an eighth of the pipeline, and its tables report means over seeds;
        # the KL, decisive-token and routing figures are means over the tokens of 50 answers per domain
        "eval": dict(n_test=150, n_kl=50, n_route=50, n_cls=200, batch_size=256, seed=0),
    },
    "gpu": {  # pack=False: without a mask SDPA can use flash attention
        "model": dict(n_layer=8, n_head=8, n_embd=512, block_size=256),
        "pretrain": dict(steps=2000, batch_size=256, lr=1e-3, warmup=200, bug_rate=0.6, mixed_frac=0.3,
                         eval_n=500, pass_k=8, seed=0, compile=True, bf16=True, pack=False, optimizer="adamw",
                         ckpt_every=250),
        "expert": dict(steps=100, prompts=32, group=16, lr=1e-3, sft_steps=100, sft_lr=1e-3, rank=16, alpha=32.0, temperature=1.0,
                       std_norm=False, clip=0.0, ppo_epochs=1, kl=0.0, micro_batch=128, sft_batch=256, eval_every=25, stop_reward=0.98,
                       eval_n=500, seed=0, pack=False, ckpt_every=25),
        "distill": dict(n_prompts=4000, samples=0, temperature=1.0, seed=0, gold_fallback=False),
        # the cpu preset's stage-2 recipe scaled up; not yet run on a GPU (docs/gpu.md ran the paper's)
        "router": dict(steps=600, batch_size=256, lr=1e-3, attn_lr=3e-5, expert_lr=1e-3, attn_lora_r=8, attn_alpha=16.0,
                       routing="hard", top_k=1, normalize=False, per_layer=False, train_experts=False, l2=1.0,
                       attn_only=False, traces=128, route_loss=1.0, decisive_weight=100.0,
                       mixed_frac=0.25, eval_n=500, seed=0, pack=False, ckpt_every=100),
        "lorahub": dict(steps=40, examples=128, l1=0.05, seed=0),
        "eval": dict(n_test=500, n_kl=200, n_route=200, n_cls=500, batch_size=512, seed=0),
    },
}


# What each flag of the presets may be: one rule per name, the same in every section and preset,
# checked when the flags are parsed (a script's own flags declare theirs in add_argument(rule=...)).
#   ">= 1" a count, "> 0" a rate, "0..1" a probability (bounds included), "a|b" a choice,
#   "list R" a comma-separated list whose items each obey R, "bool", "text" (the script checks it);
#   after a comma, what a special value means (it goes into --help).
FLAGS = {
    "n_layer": ">= 1", "n_head": ">= 1", "n_embd": ">= 1, a multiple of n_head", "block_size": ">= 1",
    "steps": ">= 1", "batch_size": ">= 1", "lr": "> 0", "warmup": ">= 0", "seed": ">= 0",
    "bug_rate": "0..1", "mixed_frac": "0..1", "eval_n": ">= 1", "pass_k": ">= 0, 0: no pass@k",
    "compile": "bool", "bf16": "bool", "pack": "bool", "optimizer": "adamw|muon",
    "ckpt_every": ">= 0, 0: never checkpoint",
    "prompts": ">= 1", "group": ">= 2, the baseline is the group mean", "sft_steps": ">= 1", "sft_lr": "> 0", "rank": ">= 1",
    "alpha": "> 0", "temperature": "> 0", "std_norm": "bool", "clip": ">= 0, 0: no clipping",
    "ppo_epochs": ">= 1", "kl": ">= 0, 0: no KL penalty", "micro_batch": ">= 0, 0: all rows at once",
    "sft_batch": ">= 1", "eval_every": ">= 0, 0: only at the end",
    "stop_reward": "0..1, 0: every step; else stop once the mean reward of the last 5 steps reaches it",
    "n_prompts": ">= 1", "samples": ">= 0, 0: one greedy trace per prompt", "gold_fallback": "bool",
    "attn_lr": "> 0", "expert_lr": "> 0", "attn_lora_r": ">= 0, 0: no attention LoRA", "attn_alpha": "> 0",
    "routing": "hard|soft|arrow|gumbel", "top_k": ">= 1, at most the number of experts", "normalize": "bool",
    "per_layer": "bool", "train_experts": "bool", "l2": ">= 0", "attn_only": "bool",
    "traces": ">= 0, 0: all", "route_loss": ">= 0, 0: the LM loss alone (the paper's)",
    "decisive_weight": ">= 0, 0: every position alike",
    "examples": ">= 1", "l1": ">= 0",
    "n_test": ">= 1", "n_kl": ">= 0, 0: no KL or decisive tokens", "n_route": ">= 1", "n_cls": ">= 1",
}

def die(msg):
    """Bad input ends the script with one clear line, never a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, and a rule per flag (FLAGS says how they read): add_argument(...,
    rule=R), checked when the flags are parsed."""
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rules = {}

    def error(self, message):
        die(f"{self.prog}: {message}")

    def add_argument(self, *names, rule=None, **kw):
        action = super().add_argument(*names, **kw)
        if rule:
            self.rules[action.dest] = rule
            if rule not in ("text", "bool"):
                action.help = f"{action.help + '; ' if action.help else ''}{rule}"
        return action

    def parse_args(self, *a, **kw):
        args = super().parse_args(*a, **kw)
        self.check_rules(args)
        return args

    def check_rules(self, args):
        for name, rule in self.rules.items():
            rule = rule.split(", ")[0]  # after a comma: what a special value means, for the help text
            if not obeys(getattr(args, name), rule):
                die(f"--{name} must be {describe(rule)} (got {getattr(args, name)!r})")


def obeys(value, rule):
    """Does value obey rule? FLAGS says how rules read."""
    if rule in ("text", "bool"):  # text: the script checks it (a path, a name); bool: argparse already did
        return True
    if rule.startswith("list "):
        each, items = rule[len("list "):], value.split(",")
        if "|" not in each:  # a list of numbers: whole ones
            if not all(x.strip().lstrip("-").isdigit() for x in items):
                return False
            items = [int(x) for x in items]
        return all(obeys(x, each) for x in items)
    if "|" in rule:
        return value in rule.split("|")
    if ".." in rule:
        lo, hi = map(float, rule.split(".."))
        return lo <= value <= hi
    op, bound = rule.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def describe(rule):
    if rule.startswith("list "):
        return "a comma-separated list, each " + describe(rule[len("list "):])
    if "|" in rule:
        return "one of " + ", ".join(rule.split("|"))
    if ".." in rule:
        return "between " + rule.replace("..", " and ")
    return rule


def true_or_false(s):
    if s.lower() not in ("1", "true", "0", "false"):
        raise ValueError(s)  # argparse reports: invalid true_or_false value
    return s.lower() in ("1", "true")


def _flag_type(default):
    return true_or_false if isinstance(default, bool) else type(default)


def parse_args(description, sections, add_args=None, argv=None):
    """--preset picks the defaults of `sections`; every key there becomes a flag. add_args(parser)
    adds the script's own flags."""
    default_preset = "gpu" if torch.cuda.is_available() else "cpu"
    pre = Parser(add_help=False)
    pre.add_argument("--preset", default=default_preset)
    known, _ = pre.parse_known_args(argv)
    if known.preset not in PRESETS:
        die(f"--preset must be one of {', '.join(PRESETS)} (got {known.preset!r})")
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=default_preset, rule="|".join(PRESETS), help=f"default {default_preset}")
    p.add_argument("--out_dir", default=None, rule="text", help="where everything is read and written (default out/PRESET)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", rule="text")
    for section in sections:
        for key, val in PRESETS[known.preset][section].items():
            on_off = dict(nargs="?", const=True) if isinstance(val, bool) else {}  # `--flag` alone means true
            p.add_argument(f"--{key}", type=_flag_type(val), default=val, rule=FLAGS[key],
                           help=f"[{section}] default {val}", **on_off)
    p.add_argument("--resume", action="store_true", help="continue from the last training checkpoint, if any")
    if add_args:
        add_args(p)
    args = p.parse_args(argv)
    if "n_head" in args and args.n_embd % args.n_head:
        die(f"--n_embd must be a multiple of --n_head (got {args.n_embd} and {args.n_head})")
    args.out_dir = args.out_dir or os.path.join("out", args.preset)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        die("--device cuda asked for, but CUDA is not available")
    return args


def setup_ddp(device):
    """Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment): join the process group, nccl
    on GPU, gloo on CPU, and return (rank, world size, this rank's device). Ranks other than 0 print
    nothing: their stdout goes to /dev/null (errors still reach stderr). Alone: (0, 1, device), and
    nothing else changes. The caller ends with dist.destroy_process_group() when world size > 1."""
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if rank > 0:
        sys.stdout = open(os.devnull, "w")
    return rank, world, device


def per_rank(n, world, flag):
    """This rank's share of a global batch of n."""
    if n % world:
        die(f"--{flag} {n} does not split evenly over {world} processes")
    return n // world


def make_out_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        die(f"cannot write to output folder {path!r}: {e.strerror}")


# ---------------------------------------------------------------------------------------------
# checkpoints

def _write_atomic(path, write, mode):
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are for reading
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(obj, path):
    """torch.save, atomically."""
    _write_atomic(path, lambda f: torch.save(obj, f), "wb")


def write_text_atomic(text, path):
    _write_atomic(path, lambda f: f.write(text), "w")


def load_checkpoint(path, what="checkpoint", keys=()):
    """torch.load with weights_only=True (a checkpoint can never run code) and clear errors."""
    if not os.path.exists(path):
        die(f"{what} not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"{path} is not a readable {what} ({type(e).__name__}); it may be truncated or not a checkpoint")
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        die(f"{path} is not a {what}: missing {', '.join(missing)}")
    return ckpt


def load_resume_state(path, args, keys):
    """The training state saved at path, when --resume is on and there is one. A state written with
    other hyperparameters is refused: resuming it would silently train something else."""
    if not args.resume or not os.path.exists(path):
        if args.resume:
            print(f"--resume: no checkpoint at {path}, starting from scratch")
        return None
    state = load_checkpoint(path, "training checkpoint", keys=("step", "config") + tuple(keys))
    ignore = {"resume", "device"}
    mine = {k: v for k, v in vars(args).items() if k not in ignore}
    theirs = {k: v for k, v in state["config"].items() if k not in ignore}
    if mine != theirs:
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        die(f"{path} was written with other settings ({', '.join(diff)}); rerun with them or without --resume")
    print(f"resuming from {path} at step {state['step']}")
    return state


def fingerprint(state_dict):
    """A short hash of the weights: adapters remember the base they were trained on."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_base(out_dir, device):
    """The frozen base model from OUT/base.pt, with its tokenizer checked."""
    ckpt = load_checkpoint(os.path.join(out_dir, "base.pt"), "base model",
                           keys=("model", "model_config", "tokenizer", "fingerprint"))
    enc = get_tokenizer()
    if ckpt["tokenizer"] != tokenizer_info(enc):
        die("base.pt was trained with another tokenizer")
    tasks = tasks_fingerprint()
    if ckpt.get("tasks", tasks) != tasks:  # (bases written before this check have none)
        die("base.pt was trained on other task definitions (tasks.py has changed since); rerun pretrain.py "
            "and the stages after it")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, enc, ckpt


# ---------------------------------------------------------------------------------------------
# stage 2's data: the verified traces of distill.py

def read_traces(folder, domains):
    """{domain: [row, ...]} from every *.jsonl in folder; a bad line ends the script with its place."""
    files = sorted(glob.glob(os.path.join(folder, "*.jsonl")))
    if not files:
        die(f"no traces in {folder} (run distill.py first)")
    data = {d: [] for d in domains}
    for path in files:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    die(f"{path}:{n}: malformed JSON line ({e.msg})")
                if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("domain", "prompt", "completion")):
                    die(f"{path}:{n}: a trace needs string fields domain, prompt and completion")
                if row["domain"] in data:  # traces of domains without an expert here are not used
                    data[row["domain"]].append(row)
    return data


def first_distinct(rows, n):
    """The first n traces of distinct prompts (all of them when n is 0)."""
    seen, out = set(), []
    for r in rows:
        if r["prompt"] not in seen and (n == 0 or len(out) < n):
            seen.add(r["prompt"])
            out.append(r)
    return out


# ---------------------------------------------------------------------------------------------
# batches and generation

def encode_example(enc, prompt, completion=None):
    """BOS + prompt (+ completion + EOS). Returns ids and how many of them are prompt."""
    bos, eos = enc.encode_single_token("<|bos|>"), enc.encode_single_token("<|eos|>")
    p = [bos] + enc.encode_ordinary(prompt)
    if completion is None:
        return p, len(p)
    return p + enc.encode_ordinary(completion) + [eos], len(p)


def completion_batch(enc, seqs, device):
    """Right-padded (idx, targets) for next-token training on completion tokens only: targets are
    -1 on the prompt and on padding. seqs is a list of (ids, n_prompt)."""
    pad = enc.encode_single_token("<|pad|>")
    T = max(len(ids) for ids, _ in seqs) - 1
    idx = np.full((len(seqs), T), pad, dtype=np.int64)  # numpy: filling rows from lists is 5x faster than torch
    tgt = np.full((len(seqs), T), -1, dtype=np.int64)
    for i, (ids, n_prompt) in enumerate(seqs):
        idx[i, :len(ids) - 1] = ids[:-1]
        tgt[i, n_prompt - 1:len(ids) - 1] = ids[n_prompt:]
    return torch.from_numpy(idx).to(device), torch.from_numpy(tgt).to(device)


def training_batch(enc, seqs, device, pack):
    """(idx, targets, pos, mask, seq) for GPT.forward; seq (R, T) says which of seqs each position
    belongs to (-1 on padding), for per-sequence weights such as RL advantages.
    With pack, completion_batch's sequences are packed several to a row, so that little compute goes
    to padding: rows as long as the longest sequence, filled first-fit, longest first. Each sequence
    keeps its own positions and attends only to itself (a block-diagonal causal mask), so the loss is
    the padded batch's, on about half as many rows. Without pack: one sequence per row, pos and mask
    None (SDPA's causal kernel; flash attention on GPU)."""
    if not pack:
        idx, tgt = completion_batch(enc, seqs, device)
        seq = torch.arange(len(seqs), device=device)[:, None].expand_as(idx)
        return idx, tgt, None, None, seq
    pad = enc.encode_single_token("<|pad|>")
    C = max(len(ids) for ids, _ in seqs) - 1
    rows, free = [], []  # the sequences in each row, and the room left in it
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0])):
        n = len(seqs[i][0]) - 1
        r = next((r for r, f in enumerate(free) if f >= n), None)
        if r is None:
            rows.append([])
            free.append(C)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= n
    idx = torch.full((len(rows), C), pad, dtype=torch.long)
    tgt = torch.full((len(rows), C), -1, dtype=torch.long)
    pos = torch.zeros((len(rows), C), dtype=torch.long)
    seq = torch.full((len(rows), C), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            ids, n_prompt = torch.tensor(seqs[i][0]), seqs[i][1]
            n = len(ids) - 1
            idx[r, at:at + n] = ids[:-1]
            tgt[r, at + n_prompt - 1:at + n] = ids[n_prompt:]
            pos[r, at:at + n] = torch.arange(n)
            seq[r, at:at + n] = i
            at += n
    causal = torch.ones(C, C, dtype=torch.bool).tril()
    mask = (seq[:, :, None] == seq[:, None, :]) & causal  # padding sees earlier padding: no empty row
    return idx.to(device), tgt.to(device), pos.to(device), mask[:, None].to(device), seq.to(device)


def generate_text(model, enc, prompts, max_new_tokens, temperature=0.0, generator=None, batch_size=256):
    """Completions (strings, without EOS) for a list of prompt strings, in batches."""
    eos, pad = enc.encode_single_token("<|eos|>"), enc.encode_single_token("<|pad|>")
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [encode_example(enc, p)[0] for p in prompts[i:i + batch_size]]
        longest = max(len(p) for p in ids)
        if longest + max_new_tokens > model.config.block_size:
            die(f"a prompt of {longest} tokens plus {max_new_tokens} new ones does not fit the model's context "
                f"of {model.config.block_size} tokens")
        for c in model.generate(ids, max_new_tokens, eos, pad, temperature=temperature, generator=generator):
            out.append(enc.decode([t for t in c if t != eos]))
    return out


@torch.no_grad()
def greedy_accuracy(model, enc, domain, n):
    """Greedy accuracy on the first n prompts of the domain's test split: the one number every
    training script prints at its end."""
    model.eval()
    exs = examples(domain, "test", n)
    outs = generate_text(model, enc, [e["prompt"] for e in exs], MAX_NEW_TOKENS)
    return sum(score(e, o) for e, o in zip(exs, outs)) / max(1, n)


def autocast(args):
    if getattr(args, "bf16", False) and args.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self):
        return time.time() - self.t0


def peak_memory(device):
    """' | peak GPU memory X GiB' on CUDA, for a script's last line; '' elsewhere."""
    if not str(device).startswith("cuda"):
        return ""
    return f" | peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
