"""
Stage 2 of Hard-Routed MoR-LoRA: the router, the routed MLP, and composing base + frozen experts.

One token's path through a block's MLP (x is the token's normalized MLP input, the output of
Block.mlp_norm; the experts' LoRAs sit on gate, up and down, stacked along a leading E axis):

    p  = softmax(R x)                     R: Linear(d_model, E, bias=False), one for all layers
    hard (the method):  e* = argmax p,  w = 1 + p[e*] - stopgrad(p[e*])   (value exactly 1)
    gumbel (baseline):  in training e* = argmax q, q = softmax((R x + gumbel noise) / tau), a sample of p,
                        w = 1 + q[e*] - stopgrad(q[e*]) (straight-through Gumbel-softmax, value exactly 1;
                        train_router.py anneals tau from 1 to 0.1); at test e* = argmax p, as hard
    soft (baselines):   top-k of p, w = p[top-k]  (normalize: w = p[top-k] / sum p[top-k])
    arrow (training-free baseline): per layer, R[l, e] = v_e, the top right singular vector of expert
                        e's [B_g A_g; B_u A_u] there; e* = argmax |<x, v_e>|, w = 1 (nothing trained)
    g = W_g x + sum_j w_j s_e B_g[e] A_g[e] x          e = idx_j, s_e = alpha_e / r_e
    u = W_u x + (same, with u's A/B)
    h = silu(g) * u
    y = W_d h + sum_j w_j s_e B_d[e] A_d[e] h          the down LoRA reads the post-activation h

With hard routing the chosen expert is added exactly as it was trained alone (unit scale). The
straight-through w gives the router dL/dp[e*] = <dL/dy, delta_e*> (summed over the three
projections), which reaches every logit through the softmax. A normalized soft top-1 has w = 1 too,
but as a constant: the router gets no gradient at all, which is why the paper uses the STE.

The delta is computed by kernels.routed_lora on the flattened (B*T) tokens. The routed MLP is just a
module inside Block, so model.generate (KV cache included) routes every generated token unchanged.
"""
import contextlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import die, fingerprint, load_checkpoint, save_atomic
from kernels import routed_lora
from lora import ATTN_TARGETS, EXPERT_TARGETS, attach, load_adapter, lora_layers

ROUTINGS = ("hard", "soft", "arrow", "gumbel")


class Router(nn.Module):
    """The routing decision for every token at every layer: (idx, w), each (N, k).

    One weight shared by all layers (the method); per_layer=True gives each layer its own (the relearn
    baseline). `forced` (one expert id for every token, or a (B,) long tensor of ids, one per sequence,
    or a (B, T) one, one per token of a forward over exactly those T positions, or "random": a
    uniformly random expert for every token at every layer; None: the router decides)
    overrides the choice but keeps the mode's weight rule, for the oracle / seq_router baselines, the
    random-router control and for tests.
    With `record` on, the last forward's p, idx and w of each layer are kept in `records[layer]`; with
    `keep_logits` on, every layer's logits (with their graph) are appended to `kept`, for the routing
    loss of train_router.py --route_loss."""

    def __init__(self, d_model, n_experts, n_layer, routing="hard", top_k=1, normalize=False, per_layer=False):
        super().__init__()
        # small random init, as the model's: tokens start spread over the experts (a zero router ties
        # everywhere and argmax would send every token to expert 0)
        self.weight = nn.Parameter(torch.randn(n_layer if per_layer else 1, n_experts, d_model) * 0.02)
        self.routing, self.top_k, self.normalize, self.per_layer = routing, top_k, normalize, per_layer
        self.forced = None
        self.record = False
        self.records = {}
        self.keep_logits = False
        self.kept = []
        self.random = torch.Generator().manual_seed(0)  # the random-router control's choices, reproducible
        self.tau = 1.0  # gumbel routing's temperature in training

    def forward(self, x, layer):
        B, T, C = x.shape
        logits = F.linear(x.reshape(B * T, C), self.weight[layer if self.per_layer else 0]).float()
        if self.routing == "arrow":
            logits = logits.abs()  # a singular vector's sign is arbitrary
        if self.keep_logits:
            self.kept.append(logits)
        p = q = F.softmax(logits, -1)
        if isinstance(self.forced, str):  # "random"
            idx = torch.randint(p.shape[1], (B * T, 1), generator=self.random).to(x.device)
        elif self.forced is not None and self.forced.dim() == 0:
            idx = self.forced.to(x.device).expand(B * T, 1)
        elif self.forced is not None and self.forced.dim() == 2:
            if tuple(self.forced.shape) != (B, T):
                raise ValueError(f"forced routing names experts for {tuple(self.forced.shape)} tokens, the batch has {(B, T)}")
            idx = self.forced.to(x.device).reshape(B * T, 1)
        elif self.forced is not None:
            if self.forced.numel() != B:
                raise ValueError(f"forced routing names {self.forced.numel()} experts for a batch of {B} sequences")
            idx = self.forced.to(x.device).repeat_interleave(T)[:, None]
        elif self.routing in ("hard", "gumbel"):
            if self.routing == "gumbel" and self.training:  # a sample of p; its relaxation carries the gradient
                gumbel = -torch.empty_like(logits).exponential_().log()
                q = F.softmax((logits + gumbel) / self.tau, -1)
            idx = q.argmax(-1, keepdim=True)
        else:
            idx = p.topk(self.top_k, -1).indices
        if self.routing == "arrow":
            w = torch.ones_like(idx, dtype=p.dtype)
        elif self.routing in ("hard", "gumbel"):
            q_e = q.gather(-1, idx)
            w = 1 + (q_e - q_e.detach())  # straight-through: exactly 1 forward (1 + q - q rounds), d/dq backward
        elif self.normalize:
            # p[top-k] / sum p[top-k] is the softmax of the chosen logits; written this way a top-1
            # weight is exactly 1 with exactly zero gradient, as the maths says
            w = F.softmax(logits.gather(-1, idx), -1)
        else:
            w = p.gather(-1, idx)
        if self.record:
            self.records[layer] = {"p": p.detach().view(B, T, -1), "idx": idx.view(B, T, -1),
                                   "w": w.detach().view(B, T, -1)}
        return idx, w


class RoutedMLP(nn.Module):
    """Replaces Block.mlp: the frozen base SwiGLU (gate, up, down) plus E expert LoRAs per projection,
    A[t] (E, r, in), B[t] (E, out, r), scale (E,). See the module docstring for the formulas."""

    def __init__(self, mlp, router, layer, A, B, scale):
        super().__init__()
        self.gate, self.up, self.down = mlp.gate, mlp.up, mlp.down
        self.A = nn.ParameterDict({t: nn.Parameter(A[t], requires_grad=False) for t in EXPERT_TARGETS})
        self.B = nn.ParameterDict({t: nn.Parameter(B[t], requires_grad=False) for t in EXPERT_TARGETS})
        self.register_buffer("scale", scale)
        self.router = router  # the same module in every block: its weight is shared, as tied embeddings are
        self.layer = layer

    def forward(self, x):
        B, T, C = x.shape
        idx, w = self.router(x, self.layer)  # one decision per token, for all three projections
        x = x.reshape(B * T, C)
        lora = lambda t, inp: routed_lora(inp, self.A[t], self.B[t], self.scale, idx, w)
        h = F.silu(self.gate(x) + lora("gate", x)) * (self.up(x) + lora("up", x))
        return (self.down(h) + lora("down", h)).view(B, T, C)


def compose(model, base_ckpt, expert_files, routing="hard", top_k=1, normalize=False, per_layer=False,
            attn_lora_r=0, attn_alpha=1.0, train_experts=False):
    """Base + frozen experts + router (+ attention LoRA on q, k, v, o unless attn_lora_r is 0), built in
    place on `model` (the base from common.load_base) and returned. Every expert file is checked
    against this base by lora.load_adapter. Trainable: router and attention LoRA; with train_experts
    also the experts' A/B (the relearn baseline). Experts of smaller rank are zero-padded to the
    largest: padded rows of A and columns of B are zero, so B A is unchanged."""
    if routing not in ROUTINGS:
        die(f"unknown routing {routing!r} (choose from {', '.join(ROUTINGS)})")
    E = len(expert_files)
    if E == 0:
        die("no experts to compose")
    if routing != "soft" and top_k != 1:
        die(f"{routing} routing is top-1 (got --top_k {top_k}); --top_k is for soft routing")
    if not 1 <= top_k <= E:
        die(f"--top_k must be between 1 and the number of experts ({E}), got {top_k}")
    adapters = [load_adapter(f, base_ckpt) for f in expert_files]
    for f, ad in zip(expert_files, adapters):
        if sorted(ad["targets"]) != sorted(EXPERT_TARGETS):
            die(f"{f} is not an MLP expert: its LoRA sits on {ad['targets']}, experts need {list(EXPERT_TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    device = model.wte.weight.device
    r = max(ad["rank"] for ad in adapters)
    scale = torch.tensor([ad["alpha"] / ad["rank"] for ad in adapters], device=device)
    per_layer = per_layer or routing == "arrow"  # Arrow's prototypes are per layer
    router = Router(cfg.n_embd, E, cfg.n_layer, routing, top_k, normalize, per_layer).to(device)
    for i, block in enumerate(model.blocks):
        A, B = {}, {}
        for t in EXPERT_TARGETS:
            lin = getattr(block.mlp, t)
            A[t] = torch.zeros(E, r, lin.in_features, device=device)
            B[t] = torch.zeros(E, lin.out_features, r, device=device)
            for e, ad in enumerate(adapters):
                A[t][e, :ad["rank"]] = ad["tensors"][f"blocks.{i}.mlp.{t}.A"]
                B[t][e, :, :ad["rank"]] = ad["tensors"][f"blocks.{i}.mlp.{t}.B"]
        block.mlp = RoutedMLP(block.mlp, router, i, A, B, scale)
        if routing == "arrow":
            with torch.no_grad():
                router.weight[i] = arrow_prototypes(A, B)
    if routing == "arrow":
        router.weight.requires_grad_(False)  # training-free
    model.router = router
    if attn_lora_r > 0:
        attach(model, ATTN_TARGETS, attn_lora_r, attn_alpha)  # new A/B are trainable, base q/k/v/o frozen
    for p in expert_parameters(model):
        p.requires_grad_(train_experts)
    # what save_mor needs to write down and load_mor to check
    router.config = dict(routing=routing, top_k=top_k, normalize=normalize, per_layer=per_layer,
                         attn_lora_r=attn_lora_r, attn_alpha=attn_alpha, train_experts=train_experts)
    router.expert_info = [{"path": os.path.abspath(f), "domain": ad["meta"].get("domain"),
                           "fingerprint": fingerprint(ad["tensors"])} for f, ad in zip(expert_files, adapters)]
    return model


def arrow_prototypes(A, B):
    """(E, d) Arrow prototypes of one layer (Ostapenko et al. 2024): for each expert, the top right
    singular vector of the update its gate and up LoRAs apply to the MLP input x, [B_g A_g; B_u A_u].
    The down LoRA reads the post-activation hidden, not x, so it has no say in x's routing."""
    delta = torch.cat([B["gate"] @ A["gate"], B["up"] @ A["up"]], dim=1)  # (E, 2 * hidden, d)
    return torch.linalg.svd(delta.float(), full_matrices=False).Vh[:, 0]


def expert_parameters(model):
    """The stacked expert A/B of every block (frozen unless train_experts)."""
    return [p for b in model.blocks for d in (b.mlp.A, b.mlp.B) for p in d.values()]


def expert_index(model, domain):
    """Which expert id serves `domain` (for the oracle baseline)."""
    domains = [x["domain"] for x in model.router.expert_info]
    if domain not in domains:
        die(f"no expert for domain {domain!r} in this model (experts: {domains})")
    return domains.index(domain)


@contextlib.contextmanager
def forced_experts(model, ids):
    """Route every token to expert ids (an int), every token of sequence b to expert ids[b] (a list or
    (B,) tensor), token t of sequence b to ids[b][t] (a (B, T) tensor), or every token at every layer
    to a random expert ("random") inside the block."""
    old = model.router.forced
    model.router.forced = ids if isinstance(ids, str) else torch.as_tensor(ids, dtype=torch.long)
    try:
        yield model
    finally:
        model.router.forced = old


@contextlib.contextmanager
def experts_zeroed(model):
    """Every expert's delta times 0 inside the block: what the base and the attention LoRA do alone."""
    scales = [b.mlp.scale.clone() for b in model.blocks]
    for b in model.blocks:
        b.mlp.scale.zero_()
    try:
        yield model
    finally:
        for b, s in zip(model.blocks, scales):
            b.mlp.scale.copy_(s)


def count_parameters(model):
    """(trainable, total); the shared router is counted once."""
    params = list(model.parameters())  # deduplicated by PyTorch
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------
# the trained MoR file: only what stage 2 trained, plus what is needed to rebuild and check the rest

def save_mor(path, model, base_ckpt, **meta):
    """Router weights, attention LoRA tensors, the expert list (paths relative to the file, domains,
    fingerprints), the routing config and the base's identity; the experts' tensors too if they were
    trained (relearn baseline). meta: training config, metrics, anything worth keeping."""
    router = model.router
    folder = os.path.dirname(os.path.abspath(path))
    params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    attn = {f"{n}.{k}" for n in lora_layers(model) for k in "AB"}
    save_atomic({
        "router": router.weight.detach().cpu().clone(),
        "attn_lora": {n: params[n] for n in attn},
        "experts": [dict(x, path=os.path.relpath(x["path"], folder)) for x in router.expert_info],
        "expert_tensors": ({n: t for n, t in params.items() if ".mlp.A." in n or ".mlp.B." in n}
                           if router.config["train_experts"] else None),
        "config": router.config,
        "base_fingerprint": base_ckpt["fingerprint"], "base_config": base_ckpt["model_config"],
        "meta": meta,
    }, path)


def load_mor(path, model, base_ckpt, expert_files=None):
    """Rebuild a trained MoR model on `model` (the base from common.load_base). The experts are read
    from the paths stored in the file (relative to it) unless expert_files is given. Refuses another
    base, another number of experts, or an expert whose tensors changed since the router was trained."""
    ckpt = load_checkpoint(path, "MoR file", keys=("router", "attn_lora", "experts", "config", "base_fingerprint"))
    if ckpt["base_fingerprint"] != base_ckpt["fingerprint"]:
        die(f"{path} was trained on another base model (fingerprint {ckpt['base_fingerprint']}, "
            f"this base is {base_ckpt['fingerprint']})")
    folder = os.path.dirname(os.path.abspath(path))
    if expert_files is None:
        expert_files = [os.path.join(folder, x["path"]) for x in ckpt["experts"]]
    if len(expert_files) != len(ckpt["experts"]):
        die(f"{path} routes over {len(ckpt['experts'])} experts, {len(expert_files)} given")
    compose(model, base_ckpt, expert_files, **ckpt["config"])
    for i, (want, have) in enumerate(zip(ckpt["experts"], model.router.expert_info)):
        if want["fingerprint"] != have["fingerprint"]:
            die(f"{path}: expert {i} ({want['domain']}) has changed: {have['path']} has fingerprint "
                f"{have['fingerprint']}, the router was trained with {want['fingerprint']}; retrain the router")
    with torch.no_grad():
        model.router.weight.copy_(ckpt["router"])
        params = dict(model.named_parameters())
        for n, t in {**ckpt["attn_lora"], **(ckpt["expert_tensors"] or {})}.items():
            if n not in params or params[n].shape != t.shape:
                die(f"{path} does not fit the composed model: tensor {n}")
            params[n].copy_(t)
    return model
