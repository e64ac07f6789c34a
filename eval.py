"""
Every table: each system's greedy accuracy on every domain's test split and on mixed prompts, the
parameters it trains and holds, how it routes, how well it preserves the experts' behaviour; and a
picture of the routing.

Systems (every one answers the same prompts: tasks.examples(D, "test", n_test) and
tasks.mixed_examples("test", n_test), greedy):
    base          the frozen base model
    expert:D      base + D's RLVF expert (OUT/experts/D.pt), on D's test prompts only (elsewhere it is
                  the base: an expert is trained on one domain, and every table compares it there)
    sft:D         base + D's SFT expert (OUT/experts/D_sft.pt), the same
    merge         one LoRA, the uniform average of the RLVF experts' A's and, separately, of their B's
                  (LoRAHub with equal weights), applied at the experts' scale alpha / r
    lorahub       the same with searched weights, OUT/mor/lorahub.pt (lorahub.py; its weights in eval.json)
    seq_router    one expert per sequence, the paper's sequence-level baseline: a prompt classifier
                  (logistic regression on the frozen base's mean-pooled final hidden states of the
                  prompt, trained here on --n_cls prompts per domain of the `router` split and their
                  domain labels) picks one RLVF expert, which answers the whole sequence alone
    oracle        the domain's own RLVF expert, known in advance (= expert:D on D; mixed: null)
    arrow         training-free token routing (router.py, routing "arrow"): nothing trained
    mor_hard, mor_paper, router_only, mor_gumbel, mor_soft, moe_soft   OUT/mor/NAME.pt (train_router.py),
                  rebuilt by router.load_mor
    attn_only     the control: OUT/mor/attn_only.pt, the attention LoRA trained alone (no experts)
    attn_fast     the same at --attn_lr 1e-2 (100x the method's on cpu), OUT/mor/attn_fast.pt: what the
                  traces can teach an attention LoRA that is allowed to learn
    mor_hard+random, mor_hard+no_experts, mor_hard+oracle   test-time swaps of the trained method:
                  every token at every layer sent to a random expert; every expert's delta zeroed (the
                  base and the attention LoRA alone); each domain's own expert forced for the whole
                  sequence (mixed: null). The attention LoRA is kept in all three.
A system whose files are missing is skipped with a note; a missing base is an error.

Measures:
    accuracy      share of right answers; a mixed answer counts only if both parts are right
    params        trainable: what is trained to build the system from the base and the given experts
                  (DESIGN.md section 2, "what is trained"); total: every parameter it holds
    purity        share of a domain's completion tokens that the router sends to that domain's
                  expert (top-1 choice for soft routing), per layer and over all layers; this and the
                  four measures below on the answers to the first n_route prompts of each domain and of
                  the mixed ones (a teacher-forced pass over them with the router recording)
    mixed purity  the same on mixed answers: tokens before the " | " belong to the first question's
                  expert, from the "|" on to the second's
    concentration mean of max_e p_e, and the share of tokens whose max_e p_e > 0.9
    switches      times the per-token majority-over-layers expert changes along one mixed answer
    confusion     per domain, the share of its completion tokens whose majority-over-layers expert is e
    decisive      on expert D's own greedy answers to the first n_kl test prompts of D, the positions
                  where the base alone would write another token than the expert: the share of their
                  (layer, token) decisions routed to D (decisive-token purity)
    behavior_kl   mean per-token KL(expert_D || system) on expert D's own greedy completions of the
                  first n_kl test prompts of D, teacher-forced, over completion tokens
A "completion token's routing" is the routing of the forward pass that wrote it: the position just
before it (the last prompt token writes the first completion token).

    python eval.py --preset cpu        # writes OUT/eval.json, OUT/report.md, OUT/routing.html
"""
import contextlib
import copy
import json
import multiprocessing
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

import kernels
from common import (Timer, completion_batch, die, encode_example, load_base, make_out_dir, parse_args,
                    write_text_atomic)
from lora import apply_adapter, load_adapter, lora_parameters, merge, weighted_adapter
from router import compose, count_parameters, expert_index, experts_zeroed, forced_experts, load_mor
from tasks import DOMAINS, MAX_NEW_TOKENS, MAX_NEW_TOKENS_MIXED, SEP, examples, mixed_examples, score

MOR_SYSTEMS = ("mor_hard", "mor_paper", "router_only", "mor_gumbel", "mor_soft", "moe_soft")
ROUTED = MOR_SYSTEMS + ("arrow",)  # the systems whose own router decides, analysed token by token
SWAPS = ("random", "no_experts", "oracle")  # test-time swaps of mor_hard
COLORS = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#CC79A7", "#0072B2", "#D55E00", "#999999"]  # Okabe-Ito


# ---------------------------------------------------------------------------------------------
# the measures: plain functions, tensors in, numbers out

def purity(choice, expert):
    """choice (L, N): top-1 expert at each of L layers for N tokens. Share sent to `expert`, over all
    layers and per layer."""
    hit = (choice == expert).float()
    return hit.mean().item(), hit.mean(1).tolist()


def mixed_purity(choice, split, first, second):
    """choice (L, T) of one mixed answer whose first `split` tokens answer the first question: the
    share of (layer, token) decisions sent to the expert of the question the token belongs to."""
    want = torch.full((choice.shape[1],), second, dtype=choice.dtype)
    want[:split] = first
    return (choice == want).float().mean().item()


def majority(choice):
    """choice (L, T) -> (T,) the expert most layers chose for each token (ties: the lowest id)."""
    return F.one_hot(choice).sum(0).argmax(-1)


def expert_switches(choice):
    """How many times the majority-over-layers expert changes along one answer, choice (L, T)."""
    m = majority(choice)
    return int((m[1:] != m[:-1]).sum())


def confusion(choice, n_experts):
    """choice (L, N) of one domain's tokens -> (E,) share of tokens whose majority-over-layers expert is e."""
    return torch.bincount(majority(choice), minlength=n_experts).div(choice.shape[1]).tolist()


def concentration(p):
    """p (..., E) routing probabilities: (mean of max_e p, share of tokens with max_e p > 0.9)."""
    top = p.max(-1).values
    return top.mean().item(), (top > 0.9).float().mean().item()


def behavior_kl(logp_ref, logp):
    """Mean over N tokens of KL(ref || system) = sum_v p_ref (log p_ref - log p); (N, V) log-probs."""
    return (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean().item()


# ---------------------------------------------------------------------------------------------
# running a model: greedy answers, teacher-forced log-probs, routing records

def maybe_forced(model, forced):
    return forced_experts(model, forced) if forced is not None else contextlib.nullcontext()


@torch.no_grad()
def greedy(model, enc, prompts, max_new_tokens, batch_size, forced=None):
    """Greedy completions as token ids (with EOS when the answer ended), in batches (as
    common.generate_text, but the ids are kept: KL and routing re-read exactly these tokens).
    forced: one expert id per prompt, held for the whole sequence."""
    if forced is not None:  # each expert answers the prompts that chose it (generation drops finished rows)
        out = [None] * len(prompts)
        for e in sorted(set(forced)):
            mine = [i for i, f in enumerate(forced) if f == e]
            with forced_experts(model, e):
                for i, c in zip(mine, greedy(model, enc, [prompts[i] for i in mine], max_new_tokens, batch_size)):
                    out[i] = c
        return out
    eos, pad = enc.encode_single_token("<|eos|>"), enc.encode_single_token("<|pad|>")
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [encode_example(enc, p)[0] for p in prompts[i:i + batch_size]]
        out += model.generate(ids, max_new_tokens, eos, pad)
    return out


def decode(enc, ids):
    eos = enc.encode_single_token("<|eos|>")
    return enc.decode([t for t in ids if t != eos])


def sequences(enc, prompts, completions):
    """(ids, n_prompt) pairs for common.completion_batch."""
    out = []
    for p, c in zip(prompts, completions):
        ids = encode_example(enc, p)[0]
        out.append((ids + list(c), len(ids)))
    return out


@torch.no_grad()
def completion_logprobs(model, seqs, enc, batch_size, device, forced=None):
    """Teacher-forced next-token log-probs at every completion position of seqs, concatenated: (N, V)."""
    out = []
    for i in range(0, len(seqs), batch_size):
        idx, tgt = completion_batch(enc, seqs[i:i + batch_size], device)
        with maybe_forced(model, None if forced is None else forced[i:i + batch_size]):
            logits, _ = model(idx)
        out.append(torch.log_softmax(logits.float(), -1)[tgt != -1].cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def routing_records(model, idx):
    """One forward with the router recording: top-1 choice (L, B, T) and probabilities (L, B, T, E)."""
    router = model.router
    router.record, router.records = True, {}
    try:
        model(idx)
        layers = range(len(model.blocks))
        choice = torch.stack([router.records[l]["idx"][..., 0] for l in layers]).cpu()
        p = torch.stack([router.records[l]["p"] for l in layers]).cpu()
    finally:
        router.record, router.records = False, {}
    return choice, p


def completion_routing(model, seqs, enc, batch_size, device):
    """Per sequence, at its completion positions: top-1 choice (L, T) and probabilities (L, T, E)."""
    out = []
    for i in range(0, len(seqs), batch_size):
        idx, tgt = completion_batch(enc, seqs[i:i + batch_size], device)
        choice, p = routing_records(model, idx)
        mask = (tgt != -1).cpu()
        out += [(choice[:, b, mask[b]], p[:, b, mask[b]]) for b in range(idx.shape[0])]
    return out


@torch.no_grad()
def prompt_features(base, enc, prompts, batch_size, device):
    """(N, d) the frozen base's final normalized hidden state, averaged over each prompt's tokens."""
    pad = enc.encode_single_token("<|pad|>")
    seen = []
    hook = base.norm.register_forward_hook(lambda m, i, out: seen.append(out.float()))
    feats = []
    try:
        for i in range(0, len(prompts), batch_size):
            ids = [encode_example(enc, p)[0] for p in prompts[i:i + batch_size]]
            # right padding: under the causal mask a real token never sees the padding after it
            idx = torch.full((len(ids), max(map(len, ids))), pad, dtype=torch.long)
            real = torch.zeros(idx.shape)
            for b, row in enumerate(ids):
                idx[b, :len(row)], real[b, :len(row)] = torch.tensor(row), 1
            seen.clear()
            base(idx.to(device))
            real = real.to(device)[..., None]
            feats.append(((seen[0] * real).sum(1) / real.sum(1)).cpu())
    finally:
        hook.remove()
    return torch.cat(feats)


def fit_classifier(x, y, n_classes, steps=300, lr=0.05, weight_decay=1e-4):
    """Multinomial logistic regression on standardized features, full batch, seeded (deterministic)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(x.shape[1], n_classes, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay)
    z = (x - mu) / sd
    for _ in range(steps):
        loss = F.cross_entropy(z @ W + b, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    W, b = W.detach(), b.detach()
    return lambda feats: (((feats - mu) / sd) @ W + b).argmax(-1).tolist()


# ---------------------------------------------------------------------------------------------
# building the systems

def n_params(params):
    return sum(p.numel() for p in params)


def with_adapter(base, ad):
    """base + one LoRA, folded into the weights (generation as fast as the base)."""
    model = copy.deepcopy(base)
    apply_adapter(model, ad)
    merge(model)
    model.eval()
    return model, n_params(lora_parameters(model))


def expert_files(args):
    """{domain: path} of the RLVF experts that exist, in domain order."""
    paths = {d: os.path.join(args.out_dir, "experts", f"{d}.pt") for d in DOMAINS}
    return {d: p for d, p in paths.items() if os.path.exists(p)}


ADAPTER_SYSTEMS = ("attn_only", "attn_fast", "lorahub")  # stage-2 files that are one plain LoRA: OUT/mor/NAME.pt


def build(name, base, base_ckpt, args):
    """(model, trainable, total), or (None, why) when the system's files are missing. A swap
    (mor_hard+random, ...) is built as the system it swaps: evaluate applies the swap."""
    base_total = n_params(base.parameters())
    expert_path = lambda d, sft=False: os.path.join(args.out_dir, "experts", f"{d}{'_sft' if sft else ''}.pt")
    name = name.split("+")[0]
    if name == "base":
        return (base, 0, base_total), ""
    if name.startswith(("expert:", "sft:")) or name in ADAPTER_SYSTEMS:
        path = (os.path.join(args.out_dir, "mor", f"{name}.pt") if name in ADAPTER_SYSTEMS
                else expert_path(name.split(":")[1], name.startswith("sft:")))
        if not os.path.exists(path):
            return None, f"{path} not found"
        ad = load_adapter(path, base_ckpt)
        model, n = with_adapter(base, ad)
        trainable = len(ad["meta"]["metrics"]["weights"]) if name == "lorahub" else n  # lorahub: E weights
        return (model, trainable, base_total + n), ""
    if name in ("merge", "seq_router", "arrow"):
        paths = list(expert_files(args).values())
        if not paths:
            return None, "no RLVF expert found"
        if name == "merge":
            ad, why = weighted_adapter([load_adapter(p, base_ckpt) for p in paths], [1 / len(paths)] * len(paths))
            if ad is None:
                return None, why
            model, n = with_adapter(base, ad)
            return (model, 0, base_total + n), ""
        # seq_router: the experts under forced routing, the classifier chooses (its parameters are
        # counted by evaluate); arrow: the experts under Arrow's prototypes
        model = compose(copy.deepcopy(base), base_ckpt, paths, routing="arrow" if name == "arrow" else "hard").eval()
        trainable, total = count_parameters(model)
        return (model, trainable, total - (model.router.weight.numel() if name == "seq_router" else 0)), ""
    path = os.path.join(args.out_dir, "mor", f"{name}.pt")
    if not os.path.exists(path):
        return None, f"{path} not found"
    model = load_mor(path, copy.deepcopy(base), base_ckpt).eval()
    return (model, *count_parameters(model)), ""


# ---------------------------------------------------------------------------------------------
# one system, all measures

def accuracies(model, enc, tests, mixed, args, pick=None):
    """Greedy answers (ids) and accuracy on each domain and on mixed prompts. pick(examples) -> one
    expert id per example, forced for its whole sequence (None: the model routes; a pick that returns
    None for the mixed prompts leaves them unanswered, accuracy None). Returns answers, accuracy and
    the picks per domain. All domains go through one generation: fewer, fuller batches."""
    groups = [([e for exs in tests.values() for e in exs], MAX_NEW_TOKENS), (mixed, MAX_NEW_TOKENS_MIXED)]
    outs, picks = [], []
    for exs, max_new in groups:
        picks.append(pick(exs) if pick and exs else None)
        if not exs or (pick and picks[-1] is None):
            outs.append(None)
            continue
        outs.append(greedy(model, enc, [e["prompt"] for e in exs], max_new, args.batch_size, picks[-1]))
    answers, chosen, start = {}, {}, 0
    for d, exs in tests.items():  # the flat list back to domains
        answers[d] = outs[0][start:start + len(exs)]
        chosen[d] = picks[0][start:start + len(exs)] if picks[0] else None
        start += len(exs)
    answers["mixed"], chosen["mixed"] = outs[1], picks[1]
    acc = {d: None for d in [*DOMAINS, "mixed"]}  # a domain left out of tests stays None
    acc.update({d: None if answers[d] is None else sum(score(e, decode(enc, c)) for e, c in zip(exs, answers[d])) / len(exs)
                for d, exs in [*tests.items(), ("mixed", mixed)]})
    return answers, acc, chosen


def routing_analysis(model, enc, tests, mixed, answers, traces, args):
    """Purity per domain and layer, the confusion matrix, decisive-token purity, mixed purity,
    concentration and switches of one routed system; and the per-token routing of every answer (for
    the picture)."""
    domains = [x["domain"] for x in model.router.expert_info]
    sep = enc.encode_ordinary(SEP.strip())[0]
    res = {"purity": {}, "purity_per_layer": {}, "confusion": {}, "decisive": {}, "experts": domains}
    routes, all_p = {}, []
    for d, exs in [*tests.items(), ("mixed", mixed)]:
        exs = exs[:args.n_route]
        seqs = sequences(enc, [e["prompt"] for e in exs], answers[d][:args.n_route])
        routes[d] = completion_routing(model, seqs, enc, args.batch_size, args.device)
        if d == "mixed":
            continue
        all_p += [p.reshape(-1, p.shape[-1]) for _, p in routes[d]]
        choice = torch.cat([c for c, _ in routes[d]], 1)
        res["confusion"][d] = confusion(choice, len(domains))
        if d in domains:
            res["purity"][d], res["purity_per_layer"][d] = purity(choice, domains.index(d))
        else:
            res["purity"][d], res["purity_per_layer"][d] = None, None
    for d, (_, seqs, _, decisive) in traces.items():  # on the expert's own answers, where the base disagrees
        if d in domains and decisive.any():
            choice = torch.cat([c for c, _ in completion_routing(model, seqs, enc, args.batch_size, args.device)], 1)
            res["decisive"][d] = purity(choice[:, decisive], domains.index(d))[0]
    res["decisive_tokens"] = {d: int(t[3].sum()) for d, t in traces.items()}
    res["max_weight_mean"], res["max_weight_gt_0.9"] = concentration(torch.cat(all_p))
    switches, mixed_pur = [], []
    for ex, ans, (choice, _) in zip(mixed, answers["mixed"], routes["mixed"]):
        switches.append(expert_switches(choice))
        d1, d2 = ex["domain"].split("+")
        if d1 in domains and d2 in domains:
            split = ans.index(sep) if sep in ans else len(ans)
            mixed_pur.append(mixed_purity(choice, split, domains.index(d1), domains.index(d2)))
    res["switches_per_mixed_answer"] = sum(switches) / len(switches)
    res["mixed_purity"] = sum(mixed_pur) / len(mixed_pur) if mixed_pur else None
    return res, routes


# ---------------------------------------------------------------------------------------------
# outputs

def fmt(x, digits=2):
    return "—" if x is None else f"{x:.{digits}f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def accuracy_table(res):
    cols = res["domains"] + ["mixed"]
    rows = []
    for s, acc in res["accuracy"].items():
        known = [acc[d] for d in res["domains"] if acc[d] is not None]
        mean = sum(known) / len(known) if len(known) == len(res["domains"]) else None  # expert:D, sft:D: their own domain only
        rows.append([s] + [fmt(acc[c]) for c in cols] + [fmt(mean)])
    return table(["system"] + cols + ["mean (domains)"], rows)


def report(res):
    doms = res["domains"]
    parts = [f"# nanoMoR evaluation ({res['preset']} preset)",
             f"{res['n_test']} test prompts per domain and {res['n_test']} mixed prompts (two questions of two "
             "domains; right only if both answers are right), the same for every system, greedy decoding. "
             "seq_router: a prompt classifier picks one expert for the whole sequence. oracle: the domain's "
             "own RLVF expert. mor_hard+X: the trained method with a test-time swap (random: a random expert "
             "per token and layer; no_experts: every expert's delta zeroed; oracle: the domain's own expert "
             "forced). attn_only: the attention LoRA trained alone on the same traces; attn_fast: the same at "
             "100x the method's attention rate.",
             "## Accuracy", accuracy_table(res)]
    if "seq_router_classifier" in res:
        c = res["seq_router_classifier"]
        parts += ["seq_router's classifier, test accuracy (trained on "
                  f"{c['train_prompts']} router-split prompts): " +
                  ", ".join(f"{d} {a:.3f}" for d, a in c["test_accuracy"].items())]
    if "lorahub_weights" in res:
        parts += ["lorahub's searched weights: " + ", ".join(f"{d} {w:+.2f}" for d, w in res["lorahub_weights"].items())]
    rows = [[s, f"{p['trainable']:,}", f"{p['total']:,}", f"{p['trainable'] / p['total']:.2%}"]
            for s, p in res["params"].items()]
    parts += ["## Parameters",
              "trainable: what is trained to build the system from the base and the given experts; total: "
              "every parameter the system holds.", table(["system", "trainable", "total", "share"], rows)]
    if res["routing"]:
        rows = [[s] + [fmt(r["purity"][d]) for d in doms] + [fmt(r["mixed_purity"]), fmt(r["max_weight_mean"]),
                fmt(r["max_weight_gt_0.9"]), fmt(r["switches_per_mixed_answer"])] for s, r in res["routing"].items()]
        parts += ["## Routing",
                  f"On the answers to the first {res['n_route']} test prompts of each domain and mixed prompts. "
                  "purity: share of a domain's completion tokens (all layers) routed to that domain's expert, by "
                  "the top-1 choice. mixed: the same on mixed answers, each part against its own domain's "
                  "expert. max p: mean of the largest routing probability; > 0.9: share of tokens where it "
                  "exceeds 0.9. switches: changes of the per-token majority expert along one mixed answer.",
                  table(["system"] + doms + ["mixed", "max p", "> 0.9", "switches"], rows)]
        rows = [[s] + [fmt(r["decisive"].get(d)) for d in doms] for s, r in res["routing"].items()]
        n_dec = next(iter(res["routing"].values()))["decisive_tokens"]
        parts += ["### Decisive-token purity",
                  "On expert D's own greedy answers to the first n_kl test prompts of D, the positions where the "
                  "base alone would write another token than the expert (count per domain: " +
                  ", ".join(f"{d} {n}" for d, n in n_dec.items()) + "): the share of their (layer, token) "
                  "decisions routed to D.", table(["system"] + doms, rows)]
        for s, r in res["routing"].items():
            rows = [[d] + [fmt(x) for x in r["confusion"][d]] for d in doms if d in r["confusion"]]
            parts += [f"### Confusion: {s}", "Rows: the domain of the test prompt; columns: the expert that the "
                      "majority of layers chose, as a share of the domain's completion tokens.",
                      table(["domain"] + [f"→ {e}" for e in r["experts"]], rows)]
        rows = [[s, d] + [fmt(x) for x in layers] for s, r in res["routing"].items()
                for d, layers in r["purity_per_layer"].items() if layers is not None]
        if rows:
            n_layer = len(rows[0]) - 2
            parts += ["### Purity per layer", table(["system", "domain"] + [f"layer {i}" for i in range(n_layer)], rows)]
    if res["behavior_kl"]:
        rows = [[s] + [fmt(kl.get(d), 4) for d in doms] for s, kl in res["behavior_kl"].items()]
        parts += ["## Behaviour preservation",
                  f"Mean per-token KL(expert_D || system) on expert D's own greedy answers to the first "
                  f"{res['n_kl']} test prompts of D, teacher-forced, over completion tokens (0 = the expert's "
                  "behaviour exactly).", table(["system"] + doms, rows)]
    if res["skipped"]:
        parts += ["## Skipped", "\n".join(f"- {s}: {why}" for s, why in res["skipped"].items())]
    parts += ["## Wall time (seconds)", table(["stage", "s"], [[k, f"{v:.1f}"] for k, v in res["seconds"].items()])]
    return "\n\n".join(parts) + "\n"


# the page's template, beside this file: __DATA__ becomes the routing data
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "routing_page.html")) as f:
    HTML = f.read()


def page_samples(enc, tests, mixed, answers, routes, per_domain=3, n_mixed=8):
    """A few answers per domain and a few mixed ones (of those with routes), each token with its expert
    at every layer."""
    eos = enc.encode_single_token("<|eos|>")
    samples = []
    picks = [(d, range(min(per_domain, len(routes[d])))) for d in tests]
    picks.append(("mixed", range(0, len(routes["mixed"]), 3)[:n_mixed]))  # every 3rd: mixed prompts cycle through the pairs
    for d, rows in picks:
        exs = mixed if d == "mixed" else tests[d]
        for i in rows:
            ex, ids, (choice, p) = exs[i], answers[d][i], routes[d][i]
            gold = " | ".join(ex["answers"]) if "answers" in ex else ex["answer"]
            samples.append({"title": f"{ex['domain']} #{i} (answer {gold})", "prompt": ex["prompt"],
                            "right": bool(score(ex, decode(enc, ids))),
                            "tokens": ["⏎" if t == eos else enc.decode([t]) for t in ids],  # EOS is routed too
                            "layers": choice.tolist(), "majority": majority(choice).tolist(),
                            "pmax": [[round(x, 2) for x in row] for row in p.max(-1).values.tolist()]})
    return samples


def routing_page(domains, n_layer, samples, routing=None):
    """The self-contained page: the data inline as JSON, drawn by the inline script. routing: the
    system's routing_analysis, for the confusion table."""
    rows = [{"domain": d, "confusion": routing["confusion"][d], "purity": routing["purity"].get(d),
             "decisive": routing["decisive"].get(d)} for d in routing["confusion"]] if routing else []
    data = {"experts": [{"domain": d, "color": COLORS[i % len(COLORS)]} for i, d in enumerate(domains)],
            "n_layer": n_layer, "samples": samples, "routing": rows}
    # "<" escaped so that no text can close the script element early
    return HTML.replace("__DATA__", json.dumps(data).replace("<", "\\u003c"))


# ---------------------------------------------------------------------------------------------

SYSTEMS = (["base"] + [f"expert:{d}" for d in DOMAINS] + [f"sft:{d}" for d in DOMAINS] +
           ["merge", "lorahub", "seq_router", "oracle", "arrow", *MOR_SYSTEMS, "attn_only", "attn_fast"] + [f"mor_hard+{s}" for s in SWAPS])


def reference_traces(base, base_ckpt, enc, args):
    """{domain: (prompts, teacher-forcing sequences, log-probs, decisive)}: each RLVF expert's own greedy
    answers to the first n_kl test prompts of its domain, its next-token distributions along them, and
    where the base alone would predict another token (the positions where the expert decides)."""
    traces = {}
    for d, path in (expert_files(args) if args.n_kl else {}).items():
        model, _ = with_adapter(base, load_adapter(path, base_ckpt))
        prompts = [e["prompt"] for e in examples(d, "test", args.n_kl, args.seed)]
        seqs = sequences(enc, prompts, greedy(model, enc, prompts, MAX_NEW_TOKENS, args.batch_size))
        logp = completion_logprobs(model, seqs, enc, args.batch_size, args.device)
        decisive = completion_logprobs(base, seqs, enc, args.batch_size, args.device).argmax(-1) != logp.argmax(-1)
        traces[d] = (prompts, seqs, logp, decisive)
    return traces


def swapped(model, swap):
    """The test-time swap of a trained MoR model (random router, experts zeroed), or nothing."""
    if swap == "random":
        return forced_experts(model, "random")
    if swap == "no_experts":
        return experts_zeroed(model)
    return contextlib.nullcontext()


def evaluate(name, model, enc, tests, mixed, traces, classifier, args, res):
    """Every measure of one built system, into res. Returns its answers and, for routed systems, routes."""
    swap = name.split("+")[1] if "+" in name else None
    pick, kl_forced = None, None
    if name.startswith(("expert:", "sft:")):  # scored on its own domain only; elsewhere it is the base
        own = name.split(":")[1]
        tests, mixed, traces = {own: tests[own]}, [], {d: t for d, t in traces.items() if d == own}
    if name == "seq_router":  # the classifier picks one expert per prompt
        pick = lambda exs: classifier([e["prompt"] for e in exs])
        kl_forced = {d: classifier(traces[d][0]) for d in traces}
    elif swap == "oracle":  # each domain's own expert; a mixed prompt has no one expert
        pick = lambda exs: None if "+" in exs[0]["domain"] else [expert_index(model, e["domain"]) for e in exs]
        kl_forced = {d: [expert_index(model, d)] * len(traces[d][0]) for d in traces}
    with swapped(model, swap):
        answers, res["accuracy"][name], chosen = accuracies(model, enc, tests, mixed, args, pick)
        res["behavior_kl"][name] = {
            d: behavior_kl(ref, completion_logprobs(model, seqs, enc, args.batch_size, args.device,
                                                    None if kl_forced is None else kl_forced[d]))
            for d, (_, seqs, ref, _) in traces.items()}
    if name == "seq_router":
        experts = [x["domain"] for x in model.router.expert_info]
        res["seq_router_votes"] = {d: {e: v.count(i) for i, e in enumerate(experts)} for d, v in chosen.items()}
    routes = None
    if name in ROUTED:
        res["routing"][name], routes = routing_analysis(model, enc, tests, mixed, answers, traces, args)
    return answers, routes


def train_classifier(base, enc, domains, args):
    """seq_router's prompt classifier over the experts of `domains` (expert i serves domains[i]): fit on
    the router split, scored on the test split. Returns (predict(prompts) -> expert ids, its record for
    eval.json)."""
    train = [(e["prompt"], i) for i, d in enumerate(domains) for e in examples(d, "router", args.n_cls, args.seed)]
    feats = lambda prompts: prompt_features(base, enc, prompts, args.batch_size, args.device)
    predict_feats = fit_classifier(feats([p for p, _ in train]), torch.tensor([i for _, i in train]), len(domains))
    predict = lambda prompts: predict_feats(feats(prompts))
    test_acc = {d: sum(c == i for c in predict([e["prompt"] for e in examples(d, "test", args.n_test, args.seed)]))
                / args.n_test for i, d in enumerate(domains)}
    return predict, {"train_prompts": len(train), "test_accuracy": test_acc, "params": classifier_size(base, len(domains))}


def classifier_size(base, n_classes):
    """seq_router's trained parameters: one weight vector and bias per class."""
    return (base.config.n_embd + 1) * n_classes


def add_oracle(res, base_total):
    """Nothing to run: on each domain, that domain's own expert, measured as expert:D."""
    experts = [d for d in DOMAINS if f"expert:{d}" in res["accuracy"]]
    if not experts:
        return "no RLVF expert found"
    res["accuracy"]["oracle"] = {**{d: res["accuracy"][f"expert:{d}"][d] if d in experts else None for d in DOMAINS},
                                 "mixed": None}
    res["behavior_kl"]["oracle"] = {d: res["behavior_kl"][f"expert:{d}"][d] for d in experts
                                    if d in res["behavior_kl"][f"expert:{d}"]}
    # it holds every expert and trains nothing new
    res["params"]["oracle"] = {"trainable": 0, "total": base_total + sum(res["params"][f"expert:{d}"]["trainable"]
                                                                         for d in experts)}
    return ""


def write_outputs(res, page, out_dir):
    write_text_atomic(json.dumps(res, indent=1), os.path.join(out_dir, "eval.json"))
    write_text_atomic(report(res), os.path.join(out_dir, "report.md"))
    if page is None:
        print("no mor_hard model: routing.html not written")
    else:
        write_text_atomic(page, os.path.join(out_dir, "routing.html"))


def evaluate_system(name, base, base_ckpt, enc, tests, mixed, traces, classifier, args):
    """Build one system and take every measure of it. Returns (its part of eval.json, the routing
    page when it is mor_hard, else None)."""
    part = {"accuracy": {}, "params": {}, "routing": {}, "behavior_kl": {}, "skipped": {}, "seconds": {}}
    t = Timer()
    built, why = build(name, base, base_ckpt, args)
    if why:
        part["skipped"][name] = why
        tqdm.write(f"skipping {name}: {why}")
    if built is None:
        return part, None
    model, trainable, total = built
    if name == "seq_router":  # what it trains is the classifier
        trainable = classifier_size(base, len(model.router.expert_info))
        total += trainable
    part["params"][name] = {"trainable": trainable, "total": total}
    if name == "lorahub":
        part["lorahub_weights"] = load_adapter(os.path.join(args.out_dir, "mor", "lorahub.pt"),
                                               base_ckpt)["meta"]["metrics"]["weights"]
    answers, routes = evaluate(name, model, enc, tests, mixed, traces, classifier, args, part)
    page = None
    if name == "mor_hard":
        page = routing_page([x["domain"] for x in model.router.expert_info], len(model.blocks),
                            page_samples(enc, tests, mixed, answers, routes), part["routing"]["mor_hard"])
    part["seconds"][name] = t()
    acc = part["accuracy"][name]
    tqdm.write(f"{name:12s} | " + " ".join(f"{d} {fmt(acc[d])}" for d in DOMAINS) +
               f" | mixed {fmt(acc['mixed'])} | {part['seconds'][name]:.1f}s")
    return part, page


_SHARED = None  # evaluate_system's arguments but the name, for forked workers (set before the pool starts)


def _evaluate_shared(name):
    torch.set_num_threads(1)
    return evaluate_system(name, *_SHARED)


def main():
    def extra(p):
        p.add_argument("--systems", default="", rule="text", help="comma-separated subset of the systems (default: all)")
        p.add_argument("--jobs", type=int, default=0, rule=">= 0, 0: one per thread torch may use on CPU, one on a GPU",
                       help="systems evaluated side by side, one thread each")
    args = parse_args(__doc__, ["eval"], extra)
    systems = [s for s in args.systems.split(",") if s] or SYSTEMS
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        die(f"unknown system {unknown[0]!r} (choose from {', '.join(SYSTEMS)})")
    timer = Timer()
    if os.environ.get("NANOMOR_COMPILE") != "1":
        # eval meets many batch shapes (every prompt batch, every teacher-forced batch) and each would
        # compile the routed kernel anew: more time than it saves. NANOMOR_COMPILE=1 compiles anyway.
        kernels.COMPILE = False
    make_out_dir(args.out_dir)
    base, enc, base_ckpt = load_base(args.out_dir, args.device)
    tests = {d: examples(d, "test", args.n_test, args.seed) for d in DOMAINS}
    mixed = mixed_examples("test", args.n_test, args.seed)
    longest = max(len(encode_example(enc, e["prompt"])[0]) for e in mixed)
    if longest + MAX_NEW_TOKENS_MIXED > base.config.block_size:
        die(f"mixed prompts need {longest + MAX_NEW_TOKENS_MIXED} positions, the base has block_size {base.config.block_size}")
    res = {"preset": args.preset, "seed": args.seed, "n_test": args.n_test, "n_kl": args.n_kl,
           "n_route": min(args.n_route, args.n_test), "domains": DOMAINS,
           "accuracy": {}, "params": {}, "routing": {}, "behavior_kl": {}, "skipped": {}, "seconds": {}}
    t = Timer()
    traces = reference_traces(base, base_ckpt, enc, args)
    res["seconds"]["traces"] = t()

    classifier = None
    if "seq_router" in systems and expert_files(args):
        t = Timer()
        domains = list(expert_files(args))
        classifier, res["seq_router_classifier"] = train_classifier(base, enc, domains, args)
        res["seconds"]["classifier"] = t()
        print("seq_router classifier, test accuracy | " +
              " ".join(f"{d} {a:.3f}" for d, a in res["seq_router_classifier"]["test_accuracy"].items()))

    shared = (base, base_ckpt, enc, tests, mixed, traces, classifier, args)
    jobs = args.jobs or (1 if args.device.startswith("cuda") else torch.get_num_threads())
    names = [s for s in systems if s != "oracle"]  # the oracle is read off the experts' results, after them
    names.sort(key=lambda s: s not in ROUTED)  # the slowest first (token routing): workers end together
    page = None
    with contextlib.ExitStack() as stack:
        if jobs > 1 and len(names) > 1:
            # Systems in parallel: generating with a model this small is mostly Python and small
            # kernels, so a one-thread process per core gets more done than one process with every
            # core. Forked workers inherit the base, the test prompts, the reference traces and the
            # classifier; each returns its part of eval.json.
            global _SHARED
            _SHARED = shared
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(min(jobs, len(names))))
            results = pool.imap_unordered(_evaluate_shared, names)
        else:
            results = (evaluate_system(name, *shared) for name in names)
        for part, system_page in tqdm(results, total=len(names), desc="eval", dynamic_ncols=True, leave=False,
                                      disable=None):  # a bar on a terminal only
            for key, value in part.items():  # the measures by system name; lorahub_weights as it is
                res[key] = {**res.get(key, {}), **value} if isinstance(value, dict) else value
            page = system_page or page
    if "oracle" in systems:  # filled in from the expert:D results, nothing to build or run
        why = add_oracle(res, n_params(base.parameters()))
        if why:
            res["skipped"]["oracle"] = why
            print(f"skipping oracle: {why}")
    order = {s: i for i, s in enumerate(SYSTEMS)}  # workers finish in any order; the tables follow SYSTEMS
    for key in ("accuracy", "params", "routing", "behavior_kl", "skipped", "seconds"):
        res[key] = dict(sorted(res[key].items(), key=lambda kv: order.get(kv[0], -1)))

    res["switches"] = {s: r["switches_per_mixed_answer"] for s, r in res["routing"].items()}
    res["seconds"]["total"] = timer()
    write_outputs(res, page, args.out_dir)
    print(accuracy_table(res))
    print(f"wrote eval.json, report.md{', routing.html' if page else ''} to {args.out_dir} | "
          f"total wall time {timer():.1f}s")


if __name__ == "__main__":
    main()
