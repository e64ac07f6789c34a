"""
The results over seeds: every figure of each seed's eval.json as per-seed values, mean and std.

    bash run.sh cpu --seeds 3          # runs seeds 0..2 into out/cpu/seed_K/, then this script
    python summary.py --preset cpu --seeds 0,1,2     # reads out/cpu/seed_K/eval.json

Writes OUT/summary.json,
    {"seeds": [...], "accuracy": {system: {domain: {"values": [...], "mean": m, "std": s}}},
     "routing": {system: {"purity" | "decisive": {domain: stats}}}, "targets": {...}}
(domain "mean" is the mean over the five domains, taken per seed), and OUT/summary.md, the same as
tables of mean ± std plus the selection targets checked on the means. std is the sample standard
deviation over seeds (0 for one seed). A system or domain missing from some seed is left out.
"""
import json
import math
import os

from common import die, parse_args, write_text_atomic

METHOD = "mor_hard"


def stats(values):
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"values": values, "mean": m, "std": s}


def collect(runs, get):
    """{key: stats} over the seeds for every key that get(run) -> {key: value or None} has in all of them."""
    per_run = [get(r) or {} for r in runs]
    keys = [k for k in per_run[0] if all(p.get(k) is not None for p in per_run)]
    return {k: stats([p[k] for p in per_run]) for k in keys}


def domain_mean(acc, domains):
    vals = [acc.get(d) for d in domains]
    return None if any(v is None for v in vals) else sum(vals) / len(vals)


def summarize(runs, seeds):
    domains = runs[0]["domains"]
    systems = [s for s in runs[0]["accuracy"] if all(s in r["accuracy"] for r in runs)]
    acc = {s: collect(runs, lambda r: {**r["accuracy"][s], "mean": domain_mean(r["accuracy"][s], domains)})
           for s in systems}
    routed = [s for s in runs[0]["routing"] if all(s in r["routing"] for r in runs)]
    routing = {s: {k: collect(runs, lambda r: r["routing"][s][k]) for k in ("purity", "decisive")} for s in routed}
    out = {"seeds": seeds, "domains": domains, "accuracy": acc, "routing": routing}
    if all("seq_router_classifier" in r for r in runs):
        out["classifier"] = collect(runs, lambda r: r["seq_router_classifier"]["test_accuracy"])
    out["targets"] = targets(runs, domains)
    return out


def targets(runs, domains):
    """The targets, each per seed then over seeds: what the method loses to each control, its accuracy
    as a share of each expert's, its lead over seq_router on mixed prompts, each RLVF expert's gain
    over the base on its own domain."""
    def per_seed(r):
        a = r["accuracy"]
        if METHOD not in a:
            return {}
        m = domain_mean(a[METHOD], domains)
        t = {f"{METHOD} - {c}": m - domain_mean(a[c], domains) for c in
             (f"{METHOD}+random", f"{METHOD}+no_experts", "attn_only", "attn_fast", "mor_paper", "router_only", "mor_gumbel",
              "lorahub") if c in a}
        if "seq_router" in a and a[METHOD]["mixed"] is not None:
            t["mixed: mor_hard - seq_router"] = a[METHOD]["mixed"] - a["seq_router"]["mixed"]
        for d in domains:
            if f"expert:{d}" in a and a[f"expert:{d}"][d] > 0:
                t[f"ratio to expert:{d}"] = a[METHOD][d] / a[f"expert:{d}"][d]
        for d in domains:
            if f"expert:{d}" in a and "base" in a:
                t[f"RLVF gain, expert:{d} - base"] = a[f"expert:{d}"][d] - a["base"][d]
        return t
    return collect(runs, per_seed)


def pm(s, digits=2):
    return "—" if s is None else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(res):
    doms = res["domains"]
    cols = doms + ["mixed", "mean"]
    n = len(res["seeds"])
    parts = [f"# nanoMoR over {n} seed{'s' if n > 1 else ''} ({', '.join(map(str, res['seeds']))})",
             "Every cell: mean ± sample std over the seeds of the whole pipeline (each seed pretrains its own "
             "base and trains its own experts and routers); the same test prompts in every seed. mean: over "
             "the five domains, per seed.",
             "## Accuracy", table(["system"] + cols, [[s] + [pm(a.get(c)) for c in cols] for s, a in res["accuracy"].items()])]
    if res["routing"]:
        rows = [[s, k] + [pm(r[k].get(d)) for d in doms] for s, r in res["routing"].items() for k in ("purity", "decisive")]
        parts += ["## Routing", "purity: share of a domain's completion tokens (all layers) routed to its expert. "
                  "decisive: the same on the positions of expert D's own answers where the base alone would "
                  "write another token.", table(["system", "measure"] + doms, rows)]
    if "classifier" in res:
        parts += ["## seq_router's prompt classifier (test accuracy)",
                  table(doms, [[pm(res["classifier"].get(d), 3) for d in doms]])]
    if res["targets"]:
        parts += ["## The selection targets (differences in mean domain accuracy, per seed, then over seeds)",
                  table(["measure", "mean ± std", "per seed"],
                        [[k, pm(v, 3), ", ".join(f"{x:.3f}" for x in v["values"])] for k, v in res["targets"].items()])]
    return "\n\n".join(parts) + "\n"


def main():
    def extra(p):
        p.add_argument("--seeds", default="0,1,2", rule="list >= 0", help="comma-separated seeds: OUT/seed_K/eval.json for each K")
    args = parse_args(__doc__, [], extra)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    for k in seeds:
        path = os.path.join(args.out_dir, f"seed_{k}", "eval.json")
        if not os.path.exists(path):
            die(f"{path} not found (run: bash run.sh PRESET --seed {k} with OUT_DIR={os.path.dirname(path)})")
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except json.JSONDecodeError as e:
            die(f"{path} is not valid JSON ({e.msg})")
    res = summarize(runs, seeds)
    write_text_atomic(json.dumps(res, indent=1), os.path.join(args.out_dir, "summary.json"))
    md = markdown(res)
    write_text_atomic(md, os.path.join(args.out_dir, "summary.md"))
    print(md)


if __name__ == "__main__":
    main()
