"""
Data efficiency: mean domain accuracy of stage-2 systems against the number of stage-2 traces per
domain. Each point is train_router.py with --traces N (the first N distinct traces of each domain)
and everything else as run.sh trains that system; its score is train_router's own end-of-training
check, greedy on the first --eval_n test prompts of every domain (eval.py's prompts).

    python sweep.py --preset cpu --traces 16,64,256,0       # 0: all the traces
    python sweep.py --preset cpu --systems mor_hard,attn_only --jobs 3

Needs OUT/base.pt, OUT/experts/*.pt and OUT/distill/ (run.sh's first stages). Writes the trained
files to OUT/sweep/mor/ (a stage-2 file remembers its base and experts, so they are linked, not
copied), and OUT/sweep.json, OUT/sweep.md (the table) and OUT/sweep.svg (the picture).
"""
import json
import os
import subprocess
import sys
import time

import torch

from common import die, parse_args, write_text_atomic
from tasks import DOMAINS

# what run.sh passes train_router.py for each system (the rest comes from the preset)
SYSTEMS = {"mor_hard": [], "mor_paper": ["--route_loss", "0"], "router_only": ["--attn_lora_r", "0"],
           "attn_only": ["--attn_only"], "attn_fast": ["--attn_only", "--attn_lr", "1e-2"],
           "mor_soft": ["--routing", "soft", "--top_k", "2"],
           "moe_soft": ["--routing", "soft", "--top_k", "2", "--per_layer", "--train_experts"]}
COLORS = {"mor_hard": "#0072B2", "mor_paper": "#56B4E9", "router_only": "#009E73", "attn_only": "#D55E00",
          "attn_fast": "#F0E442", "mor_soft": "#CC79A7", "moe_soft": "#E69F00"}


def link_inputs(out_dir, sweep_dir):
    """The sweep's folder sees the run's base, experts and traces (symlinks: nothing is copied)."""
    os.makedirs(sweep_dir, exist_ok=True)
    for name in ("base.pt", "experts", "distill"):
        src, dst = os.path.abspath(os.path.join(out_dir, name)), os.path.join(sweep_dir, name)
        if not os.path.exists(src):
            die(f"{src} not found (run bash run.sh first, at least up to distill.py)")
        if not os.path.lexists(dst):
            os.symlink(src, dst)


def accuracy_of(path):
    """train_router's own check, stored in the file it wrote."""
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]["metrics"]["accuracy"]


def picture(res):
    """A small line chart as SVG: x the traces per domain (log scale; 'all' at the right), y the mean."""
    W, H, L, B = 560, 340, 60, 50
    xs = res["traces"]
    labels = [str(n) if n else "all" for n in xs]
    px = lambda i: L + (W - L - 20) * (i / max(1, len(xs) - 1))
    py = lambda a: H - B - (H - B - 20) * a
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>']
    for a in (0, 0.25, 0.5, 0.75, 1.0):
        svg.append(f'<line x1="{L}" x2="{W - 20}" y1="{py(a)}" y2="{py(a)}" stroke="#ddd"/>'
                   f'<text x="{L - 8}" y="{py(a) + 4}" text-anchor="end">{a:.2f}</text>')
    for i, lab in enumerate(labels):
        svg.append(f'<text x="{px(i)}" y="{H - B + 18}" text-anchor="middle">{lab}</text>')
    svg.append(f'<text x="{(W + L) / 2}" y="{H - 10}" text-anchor="middle">stage-2 traces per domain</text>'
               f'<text x="16" y="{(H - B) / 2}" transform="rotate(-90 16 {(H - B) / 2})" text-anchor="middle">'
               'mean domain accuracy</text>')
    for k, (s, row) in enumerate(res["mean"].items()):
        pts = " ".join(f"{px(i)},{py(row[str(n)])}" for i, n in enumerate(xs))
        c = COLORS.get(s, "#333")
        svg.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        svg += [f'<circle cx="{px(i)}" cy="{py(row[str(n)])}" r="3" fill="{c}"/>' for i, n in enumerate(xs)]
        svg.append(f'<text x="{L + 10}" y="{32 + 16 * k}" fill="{c}">{s}</text>')
    return "\n".join(svg + ["</svg>"]) + "\n"


def main():
    def extra(p):
        p.add_argument("--traces", default="16,64,256,0", rule="list >= 0, 0: all", help="traces per domain")
        p.add_argument("--systems", default="mor_hard,attn_only,moe_soft", rule="text",
                       help=f"comma-separated, from {', '.join(SYSTEMS)}")
        p.add_argument("--jobs", type=int, default=(os.cpu_count() or 1) + 1, rule=">= 1", help="trainings side by side, one thread each")
    args = parse_args(__doc__, ["eval"], extra)
    traces = [int(n) for n in args.traces.split(",")]
    systems = [s for s in args.systems.split(",") if s]
    if not systems or any(s not in SYSTEMS for s in systems):
        die(f"--systems must name some of {', '.join(SYSTEMS)} (got {args.systems!r})")
    sweep_dir = os.path.join(args.out_dir, "sweep")
    link_inputs(args.out_dir, sweep_dir)
    domains = [d for d in DOMAINS if os.path.exists(os.path.join(sweep_dir, "experts", f"{d}.pt"))]
    if not domains:
        die(f"no RLVF expert in {os.path.join(args.out_dir, 'experts')} (run bash run.sh first)")
    runs = [(s, n) for n in traces for s in systems]
    path = lambda s, n: os.path.join(sweep_dir, "mor", f"{s}_t{n}.pt")
    todo, running, t0 = [r for r in runs if not os.path.exists(path(*r))], [], time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    while todo or running:
        while todo and len(running) < args.jobs:
            s, n = todo.pop(0)
            cmd = [sys.executable, "train_router.py", "--preset", args.preset, "--out_dir", sweep_dir, "--name",
                   f"{s}_t{n}", "--traces", str(n), "--eval_n", str(args.n_test), "--seed", str(args.seed),
                   "--domains", ",".join(domains), *SYSTEMS[s]]
            log = open(os.path.join(sweep_dir, f"{s}_t{n}.log"), "w")
            running.append(((s, n), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
            print(f"== {s} with {n or 'all'} traces per domain started")
        time.sleep(1)
        for item in list(running):
            (s, n), proc, log = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            if proc.returncode != 0:
                for _, p, _ in running:
                    p.kill()
                die(f"{s} with --traces {n} failed; see {log.name}")
            print(f"== {s} with {n or 'all'} traces done ({time.time() - t0:.0f}s)")
    acc = {s: {str(n): accuracy_of(path(s, n)) for n in traces} for s in systems}
    mean = {s: {n: sum(a[d] for d in domains) / len(domains) for n, a in row.items()} for s, row in acc.items()}
    res = {"traces": traces, "n_test": args.n_test, "accuracy": acc, "mean": mean}
    header = ["system"] + [f"{n or 'all'} traces" for n in traces]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows += ["| " + " | ".join([s] + [f"{mean[s][str(n)]:.3f}" for n in traces]) + " |" for s in systems]
    md = (f"Mean domain accuracy (greedy, first {args.n_test} test prompts per domain) against stage-2 traces "
          "per domain.\n\n" + "\n".join(rows) + "\n")
    write_text_atomic(json.dumps(res, indent=1), os.path.join(args.out_dir, "sweep.json"))
    write_text_atomic(md, os.path.join(args.out_dir, "sweep.md"))
    write_text_atomic(picture(res), os.path.join(args.out_dir, "sweep.svg"))
    print(md + f"wrote sweep.json, sweep.md, sweep.svg to {args.out_dir}")


if __name__ == "__main__":
    main()
