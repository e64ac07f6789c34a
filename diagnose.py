"""
Where the method loses: three diagnostics on a finished run (not a stage of run.sh).

    python diagnose.py mixed --out_dir out/cpu              # mor_hard on the first 60 mixed test prompts
    python diagnose.py lost --out_dir out/cpu --domain hop  # the hop prompts mor_hard loses to the hop expert
    python diagnose.py heldout --out_dir out/cpu            # mor_hard against each expert on 300 more prompts

mixed: each mixed test prompt answered twice, greedily, with the router's own choices and with each
part's expert forced at every layer on every token of its part: the first question and the first
answer to the first question's expert, from the "|" on (in the prompt and in the answer) to the
second's. If the two score alike, routing is not what holds the mixed prompts back: the experts are,
in that context (each learned from prompts of one question). Both recompute the whole sequence for
every token (no KV cache: the forced experts follow the tokens), one prompt at a time.

lost: the first --n test prompts of --domain that the domain's expert alone answers right and the
system wrong, each with the first token where the two answers part and the expert the router chose
for the position that wrote it, at every layer, with its probability.

heldout: the 95%-of-each-expert check of eval.py on another sample: --n prompts per domain of the
`router` split (drawn afresh, none among the traces stage 2 trained on), each domain's expert alone
against the system, greedy.
"""
import contextlib
import copy
import os

import torch

from common import Parser, die, encode_example, first_distinct, generate_text, load_base, read_traces
from eval import routing_records
from lora import apply_adapter, load_adapter
from router import expert_index, forced_experts, load_mor
from tasks import DOMAINS, MAX_NEW_TOKENS, MAX_NEW_TOKENS_MIXED, SEP, examples, mixed_examples, score, verify


@torch.no_grad()
def answer(model, enc, prompt, max_new_tokens, parts=None):
    """The greedy answer (a string). parts (e1, e2): expert e1 on every token before the prompt's
    separator, e2 from it on, and the same in the answer; None: the router decides."""
    eos, sep = enc.encode_single_token("<|eos|>"), enc.encode_ordinary(SEP.strip())[0]
    ids = encode_example(enc, prompt)[0]
    experts = [parts[0] if i < ids.index(sep) else parts[1] for i in range(len(ids))] if parts else None
    out = []
    for _ in range(max_new_tokens):
        with forced_experts(model, [experts]) if parts else contextlib.nullcontext():
            logits, _ = model(torch.tensor([ids + out]))
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
        if parts:
            experts.append(parts[1] if sep in out else parts[0])
    return enc.decode(out)


def mixed(model, enc, n):
    """Right answers (first part, second part, both) with the router's choices and with each part's
    expert forced, per ordered pair of domains and in all."""
    counts = {}
    for ex in mixed_examples("test", n):
        d1, d2 = ex["domain"].split("+")
        for how, parts in (("router", None), ("oracle", (expert_index(model, d1), expert_index(model, d2)))):
            got = answer(model, enc, ex["prompt"], MAX_NEW_TOKENS_MIXED, parts).split(SEP.strip())
            right = [len(got) == 2 and bool(verify(got[i], ex["answers"][i])) for i in (0, 1)]
            for key in (ex["domain"], "all"):
                c = counts.get((how, key), [0, 0, 0, 0])
                counts[how, key] = [total + x for total, x in zip(c, (*right, all(right), 1))]
    return counts


def lost(model, expert, enc, domain, n):
    """(prompt, expert's answer, system's answer, the shared start, [(expert, p) per layer]) for each
    prompt the system loses."""
    exs = examples(domain, "test", n)
    prompts = [e["prompt"] for e in exs]
    theirs, ours = (generate_text(m, enc, prompts, MAX_NEW_TOKENS) for m in (expert, model))
    domains = [x["domain"] for x in model.router.expert_info]
    rows = []
    for ex, a, b in zip(exs, theirs, ours):
        if not score(ex, a) or score(ex, b):
            continue
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        idx = torch.tensor([encode_example(enc, ex["prompt"])[0] + enc.encode_ordinary(a[:at])])
        choice, p = routing_records(model, idx)
        rows.append((ex["prompt"].strip(), a, b, a[:at],
                     [(domains[c], float(q.max())) for c, q in zip(choice[:, 0, -1].tolist(), p[:, 0, -1])]))
    return rows


def heldout(model, experts, enc, trained, n):
    """{domain: (system's right answers, expert's right answers, n)} on n router-split prompts per domain
    that are not among `trained` (the prompts of the traces stage 2 read)."""
    counts = {}
    for d, expert in experts.items():
        exs = [e for e in examples(d, "router", 20 * n, seed=10_000) if e["prompt"] not in trained[d]][:n]
        prompts = [e["prompt"] for e in exs]
        counts[d] = tuple(sum(score(e, o) for e, o in zip(exs, generate_text(m, enc, prompts, MAX_NEW_TOKENS)))
                          for m in (model, expert)) + (len(exs),)
    return counts


def main():
    p = Parser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("what", choices=["mixed", "lost", "heldout"])
    p.add_argument("--out_dir", default="out/cpu", rule="text", help="a finished run (bash run.sh)")
    p.add_argument("--system", default="mor_hard", rule="text", help="a routed system, OUT/mor/NAME.pt")
    p.add_argument("--domain", default="hop", rule="|".join(DOMAINS), help="lost: the domain")
    p.add_argument("--n", type=int, default=0, rule=">= 0, 0: 60 mixed prompts, 150 test prompts, 300 held-out ones")
    args = p.parse_args()
    path = os.path.join(args.out_dir, "mor", f"{args.system}.pt")
    if not os.path.exists(path):
        die(f"{path} not found (a routed system of a finished run: mor_hard, mor_paper, router_only, ...)")
    base, enc, base_ckpt = load_base(args.out_dir, "cpu")
    model = load_mor(path, copy.deepcopy(base), base_ckpt).eval()
    if args.what == "mixed":
        counts = mixed(model, enc, args.n or 60)
        print(f"{args.system} on mixed test prompts: right first part / second part / both, of n")
        for key in sorted({k for _, k in counts}, key=lambda k: (k == "all", k)):
            print(f"{key:9s} | " + " | ".join(f"{how} {'/'.join(map(str, counts[how, key][:3]))} of {counts[how, key][3]}"
                                             for how in ("router", "oracle")))
        return
    experts = {}
    for d in ([args.domain] if args.what == "lost" else [x["domain"] for x in model.router.expert_info]):
        experts[d] = copy.deepcopy(base)
        apply_adapter(experts[d], load_adapter(os.path.join(args.out_dir, "experts", f"{d}.pt"), base_ckpt))
        experts[d].eval()
    if args.what == "heldout":
        n_traces = torch.load(path, map_location="cpu", weights_only=True)["meta"]["train_config"]["traces"]
        traces = read_traces(os.path.join(args.out_dir, "distill"), list(experts))
        trained = {d: {t["prompt"] for t in first_distinct(traces[d], n_traces)} for d in experts}
        print(f"{args.system} against each expert alone on router-split prompts stage 2 did not train on: right answers")
        for d, (ours, theirs, n) in heldout(model, experts, enc, trained, args.n or 300).items():
            print(f"{d:5s} | {args.system} {ours:.0f} | expert:{d} {theirs:.0f} | of {n} | ratio {ours / max(theirs, 1):.3f}")
        return
    rows = lost(model, experts[args.domain], enc, args.domain, args.n or 150)
    print(f"{args.system} loses {len(rows)} of the first {args.n or 150} {args.domain} test prompts that expert:{args.domain} gets right")
    for prompt, a, b, start, route in rows:
        print(f"{prompt!r}: expert {a!r}, {args.system} {b!r}; after {start!r} the router chose "
              + ", ".join(f"{e} {q:.2f}" for e, q in route) + " (layers 0..)")


if __name__ == "__main__":
    main()
