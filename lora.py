"""
LoRA: y = W x + s * B (A dropout(x)), with W frozen, A (r x in) Kaiming-uniform, B (out x r) zero,
so a fresh adapter changes nothing. s = alpha / r is stored with the adapter and reused as is.

Experts sit on the MLP projections (gate, up, down) of every block; the small attention LoRA of
stage 2 sits on q, k, v, o. Adapter files hold only the A/B tensors and what is needed to check
they fit: rank, alpha, targets, the base model's fingerprint and shapes.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import die, load_checkpoint, save_atomic

EXPERT_TARGETS = ("gate", "up", "down")
ATTN_TARGETS = ("q", "k", "v", "o")


class LoRALinear(nn.Module):
    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear, and as peft does
        self.dropout = dropout
        self.enabled = True
        self.merged = False
        base.weight.requires_grad_(False)

    def delta(self, x):
        x = F.dropout(x, self.dropout, self.training)
        return self.scale * F.linear(F.linear(x, self.A), self.B)

    def forward(self, x):
        y = self.base(x)
        if self.enabled and not self.merged:
            y = y + self.delta(x)
        return y

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.scale * self.B @ self.A
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.scale * self.B @ self.A
            self.merged = False


def target_modules(model, targets):
    """(parent, attribute name, full name) of every nn.Linear whose name ends in one of targets."""
    found = []
    for name, module in model.named_modules():
        for attr in targets:
            child = getattr(module, attr, None)
            if isinstance(child, (nn.Linear, LoRALinear)):
                found.append((module, attr, f"{name}.{attr}" if name else attr))
    return found


def attach(model, targets, rank, alpha, dropout=0.0):
    """Wrap every target Linear of model in a LoRALinear; returns {name: LoRALinear}."""
    layers = {}
    for parent, attr, name in target_modules(model, targets):
        layer = LoRALinear(getattr(parent, attr), rank, alpha, dropout)
        setattr(parent, attr, layer)
        layers[name] = layer
    if not layers:
        raise ValueError(f"no modules named {targets} in the model")
    return layers


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model):
    return [p for m in lora_layers(model).values() for p in (m.A, m.B)]


@contextlib.contextmanager
def adapters_off(model):
    """The base model's behaviour, e.g. the reference policy of a KL term."""
    layers = lora_layers(model).values()
    old = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(layers, old):
            m.enabled = e


def merge(model):
    for m in lora_layers(model).values():
        m.merge()


def unmerge(model):
    for m in lora_layers(model).values():
        m.unmerge()


def save_adapter(path, model, base_ckpt, **meta):
    """Adapter-only file: A/B of every LoRA layer plus rank, alpha, targets and the base's identity.
    meta holds domain, method, training config, metrics, anything worth keeping."""
    layers = lora_layers(model)
    first = next(iter(layers.values()))
    save_atomic({
        "tensors": {f"{n}.{k}": getattr(m, k).detach().cpu().clone() for n, m in layers.items() for k in "AB"},
        "rank": first.rank, "alpha": first.alpha,
        "targets": sorted({n.rsplit(".", 1)[1] for n in layers}),
        "base_fingerprint": base_ckpt["fingerprint"], "base_config": base_ckpt["model_config"],
        "meta": meta,
    }, path)


def load_adapter(path, base_ckpt):
    """An adapter file, refused with a clear message if it was trained on another base."""
    ad = load_checkpoint(path, "adapter", keys=("tensors", "rank", "alpha", "targets", "base_fingerprint"))
    if ad.get("base_config") != base_ckpt["model_config"]:
        die(f"{path} was trained on a base with other shapes ({ad.get('base_config')}), "
            f"not this one ({base_ckpt['model_config']})")
    if ad["base_fingerprint"] != base_ckpt["fingerprint"]:
        die(f"{path} was trained on another base model (fingerprint {ad['base_fingerprint']}, "
            f"this base is {base_ckpt['fingerprint']}); retrain it on this base")
    return ad


def weighted_adapter(ads, weights):
    """One adapter from several: sum_i w_i A_i and, separately, sum_i w_i B_i (the merges of eval.py and
    lorahub.py). None, with the reason, when they differ in rank, alpha or targets."""
    if len({(ad["rank"], ad["alpha"], tuple(ad["targets"])) for ad in ads}) != 1:
        return None, "the experts differ in rank, alpha or targets"
    tensors = {k: sum(float(w) * ad["tensors"][k] for w, ad in zip(weights, ads)) for k in ads[0]["tensors"]}
    return dict(ads[0], tensors=tensors), ""


def apply_adapter(model, ad):
    """Attach the adapter's layers to model and load its tensors."""
    layers = attach(model, tuple(ad["targets"]), ad["rank"], ad["alpha"])
    want = {f"{n}.{k}" for n in layers for k in "AB"}
    if want != set(ad["tensors"]):
        die("adapter does not fit this model: its layers differ from the model's")
    with torch.no_grad():
        for n, m in layers.items():
            for k in "AB":
                t = ad["tensors"][f"{n}.{k}"]
                if t.shape != getattr(m, k).shape:
                    die(f"adapter tensor {n}.{k} has shape {tuple(t.shape)}, the model needs {tuple(getattr(m, k).shape)}")
                getattr(m, k).copy_(t)
    return layers
