"""
Stage 2, step 1: each domain's expert writes reasoning traces for the router to learn from.

For each domain D, the RLVF expert OUT/experts/D.pt alone (on the frozen base) answers the first
--n_prompts prompts of D's `router` split (never its training data): one greedy completion and
--samples completions at --temperature per prompt. A trace is kept only if it ended with EOS and the
verifier accepts its answer; duplicates of a (prompt, completion) are dropped, and a prompt drawn
twice is answered greedily only once.
The cpu and gpu presets keep greedy traces only (--samples 0, more prompts instead): the verifier reads
only the answer, and a sampled bool or pick answer is often right by chance (yes/no, one of four) after
wrong reasoning; greedy traces are the expert's own behaviour, which stage 2 is meant to preserve.

    python distill.py                        # all domains
    python distill.py --domains add,hop
Writes OUT/distill/D.jsonl, one {"domain", "prompt", "completion", "answer", "source"} a line,
source "greedy" or "sample", and prints the yield (kept / generated) per domain. With --gold_fallback (the
smoke preset only) a domain whose expert wrote no verified trace gets gold router-split traces instead,
marked source "gold", so that the smoke pipeline runs end to end.
"""
import copy
import json
import os

import torch
from tqdm import tqdm

from common import Timer, die, encode_example, load_base, make_out_dir, parse_args, write_text_atomic
from lora import apply_adapter, load_adapter
from tasks import DOMAINS, MAX_NEW_TOKENS, examples, verify


@torch.no_grad()
def distill_domain(model, enc, domain, args, generator):
    """Kept rows and counts for one domain. Greedy rows come first, so a sample that repeats the
    greedy trace is the one dropped as a duplicate. A prompt drawn twice is answered greedily once:
    its second greedy trace would be the same (a small domain like hop repeats most of its prompts)."""
    eos, pad = enc.encode_single_token("<|eos|>"), enc.encode_single_token("<|pad|>")
    exs = examples(domain, "router", args.n_prompts, args.seed)
    distinct = list({ex["prompt"]: ex for ex in exs}.values())  # in order of first appearance
    rows, seen = [], set()
    counts = {"distinct": len(distinct), "generated": 0, "no_eos": 0, "wrong": 0, "duplicate": len(exs) - len(distinct)}
    for source, temp, todo in (("greedy", 0.0, distinct),
                               ("sample", args.temperature, [ex for ex in exs for _ in range(args.samples)])):
        for i in tqdm(range(0, len(todo), args.batch_size), desc=f"distill:{domain}:{source}", leave=False,
                      dynamic_ncols=True, disable=None):  # a bar on a terminal only
            part = todo[i:i + args.batch_size]
            prompts = [encode_example(enc, ex["prompt"])[0] for ex in part]
            comps = model.generate(prompts, MAX_NEW_TOKENS, eos, pad, temperature=temp, generator=generator)
            counts["generated"] += len(part)
            for ex, c in zip(part, comps):
                if not c or c[-1] != eos:  # ran out of tokens: not a finished trace
                    counts["no_eos"] += 1
                    continue
                text = enc.decode(c[:-1])
                if not verify(text, ex["answer"]):
                    counts["wrong"] += 1
                elif (ex["prompt"], text) in seen:
                    counts["duplicate"] += 1
                else:
                    seen.add((ex["prompt"], text))
                    rows.append({"domain": domain, "prompt": ex["prompt"], "completion": text,
                                 "answer": ex["answer"], "source": source})
    counts["kept"] = len(rows)
    return rows, counts


def main():
    def extra(p):
        p.add_argument("--domains", default=",".join(DOMAINS), rule="list " + "|".join(DOMAINS), help="the experts' domains (default: all)")
        p.add_argument("--batch_size", type=int, default=256, rule=">= 1", help="prompts generated at once")
    args = parse_args(__doc__, ["distill"], extra)
    domains = args.domains.split(",")
    for d in domains:
        path = os.path.join(args.out_dir, "experts", f"{d}.pt")
        if not os.path.exists(path):
            die(f"no expert for domain {d}: {path} not found (run train_expert.py --domain {d} first)")
    out_dir = os.path.join(args.out_dir, "distill")
    make_out_dir(out_dir)
    base, enc, base_ckpt = load_base(args.out_dir, args.device)
    timer = Timer()
    for d in domains:
        path = os.path.join(args.out_dir, "experts", f"{d}.pt")
        model = copy.deepcopy(base)
        apply_adapter(model, load_adapter(path, base_ckpt))
        model.eval()
        # one reproducible sampling stream per (seed, domain), whichever --domains are asked for
        gen = torch.Generator(device=args.device).manual_seed(args.seed * 1000 + DOMAINS.index(d))
        rows, n = distill_domain(model, enc, d, args, gen)
        if not rows and args.gold_fallback:
            # Only the smoke preset does this: its barely trained experts are never right, and the
            # pipeline must still run end to end. Gold traces of the router split, marked as such.
            rows = [dict(ex, source="gold") for ex in examples(d, "router", args.n_prompts, args.seed)]
            print(f"distill {d:5s} | no verified trace: --gold_fallback keeps {len(rows)} gold router-split traces")
        out = os.path.join(out_dir, f"{d}.jsonl")
        write_text_atomic("".join(json.dumps(r) + "\n" for r in rows), out)
        greedy = sum(r["source"] == "greedy" for r in rows)
        print(f"distill {d:5s} | {args.n_prompts} prompts, {n['distinct']} distinct | kept {n['kept']} of "
              f"{n['generated']} generated ({n['kept'] / max(1, n['generated']):.0%}): greedy {greedy}, sampled "
              f"{n['kept'] - greedy} | dropped: wrong {n['wrong']}, no EOS {n['no_eos']}, duplicate {n['duplicate']} "
              f"| wrote {out}")
    print(f"distilled {len(domains)} domain(s) in {timer():.0f}s")


if __name__ == "__main__":
    main()
