"""
The routed LoRA layer: for each token, add the LoRA deltas of the experts the router chose.

    delta[n] = sum_j w[n, j] * scale[e] * B[e] @ (A[e] @ x[n]),   e = idx[n, j]

x (N, in) tokens (batch and time flattened), A (E, r, in), B (E, out, r), scale (E,) each expert's
alpha / r (a constant: it gets no gradient), idx (N, k) chosen experts, w (N, k) their weights. Hard
routing is k = 1 with the straight-through w = 1 + p - p.detach(): 1 in value, a gradient to the
router in backward. Gradients reach x, w and, when they require it (the relearn baseline), A and B.

Three implementations, in the llm.c manner: a slow one that is obviously right, fast ones checked
against it, then timed (`python kernels.py`).

1. routed_lora_reference: loop over experts, gather each one's tokens, index_add the result back (as
   the paper's code does). Every expert scans all N tokens, and in backward every gather scatters into
   a full (N, in) gradient, so it costs O(E * N) memory traffic plus E rounds of small kernels.
2. routed_lora_fused: concatenated ranks. Every token goes through all experts' A at once (one
   (N, in) x (in, E*r) matmul), a dense (N, E) weight matrix, zero where an expert was not chosen,
   masks the result, one matmul with all B's comes back. No data-dependent shapes or control flow and
   the same code for hard and soft: this function alone is what torch.compile sees. It does E / k
   times the useful work, which is cheap while E * r is small next to the MLP's width.
3. routed_lora_sorted: sort the (token, choice) slots by expert, run each expert on its contiguous
   segment, unsort. O(k) work per token plus a small per-expert cost (two matmul launches each way),
   so it wins when each token touches few of many experts. Its backward is written by hand: two
   matmuls per expert written in place, gathers instead of scatters, none of autograd's per-expert
   bookkeeping (autograd through the same loop was about 1.4x slower at E=32 on CPU).

routed_lora picks between 2 and 3 by size (see `pick`). 2 is compiled on CUDA, lazily and once per
process; on CPU it runs eagerly (compiled it is no faster there, `python kernels.py`, and each process
would spend seconds compiling it). NANOMOR_COMPILE=1 compiles on every device, NANOMOR_COMPILE=0 (or
kernels.COMPILE = False) on none. If torch.compile fails (no C++ compiler, say) it warns once and runs
eagerly from then on.
"""
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from common import Parser


# ----------------------------------------------------------------------------------------------------
# 1. reference: the obvious loop over experts

def routed_lora_reference(x, A, B, scale, idx, w):
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)
    for e in range(A.shape[0]):
        tok, j = (idx == e).nonzero(as_tuple=True)  # tokens routed to e, and which of their k choices it was
        if len(tok) == 0:
            continue
        delta = (x[tok] @ A[e].T) @ B[e].T
        out.index_add_(0, tok, (delta * (scale[e] * w[tok, j])[:, None]).to(out.dtype))
    return out


# ----------------------------------------------------------------------------------------------------
# 2. fused: concatenated ranks, torch.compile

COMPILE = {"1": True, "0": False}.get(os.environ.get("NANOMOR_COMPILE"))  # None: on CUDA only
_compiled = None  # torch.compile(_concat_ranks), built on the first call


def _concat_ranks(x, A, B, scale, idx, w):
    E, r, d_in = A.shape
    dense = torch.zeros(x.shape[0], E, dtype=w.dtype, device=w.device).scatter_add(1, idx, w) * scale
    h = x @ A.reshape(E * r, d_in).T  # (N, E*r): rank block e is A[e] x
    h = h * dense.repeat_interleave(r, dim=1).to(h.dtype)
    return h @ B.permute(1, 0, 2).reshape(B.shape[1], E * r).T  # column block e of B_cat is B[e]


def routed_lora_fused(x, A, B, scale, idx, w):
    global _compiled, COMPILE
    if COMPILE or (COMPILE is None and x.is_cuda):
        try:
            if _compiled is None:
                _compiled = torch.compile(_concat_ranks)  # no data-dependent shapes inside
            # The number of tokens changes with every batch: compile for any number from the start
            # (left to itself, dynamo compiles for the first number, then again for any). A graph per
            # expert shape (gate/up, down) and grad mode remains: 5 in a smoke router run.
            for t in (x, idx, w):
                torch._dynamo.maybe_mark_dynamic(t, 0)
            return _compiled(x, A, B, scale, idx, w)
        except Exception as err:
            out = _concat_ranks(x, A, B, scale, idx, w)  # a caller's error (bad shapes) raises here, readably
            COMPILE = False
            print(f"kernels.py: torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                  "running the fused kernel eagerly")
            return out
    return _concat_ranks(x, A, B, scale, idx, w)


# ----------------------------------------------------------------------------------------------------
# 3. sorted: one segment per expert

def _segment_mm(x, W, counts):
    """Rows of x in consecutive segments of counts[e] rows; segment e times W[e]. (M, a), (E, a, b) -> (M, b)."""
    out = x.new_empty(x.shape[0], W.shape[2])
    for xe, We, oe in zip(x.split(counts), W, out.split(counts)):
        torch.mm(xe, We, out=oe)  # written in place: no torch.cat of E pieces
    return out


def _unsort(ys, inv, k):
    """Sorted slots back to tokens, summing each token's k slots."""
    out = ys.index_select(0, inv)
    return out if k == 1 else out.view(-1, k, out.shape[1]).sum(1)


class _SortedLoRA(torch.autograd.Function):
    # A slot is one (token n, choice j) pair, slot = n * k + j; sorted by expert, slot i sits at inv[i].

    @staticmethod
    def forward(ctx, x, A, B, scale, idx, w):
        k = idx.shape[1]
        A, B = A.to(x.dtype), B.to(x.dtype)  # under autocast x may be bf16 while the experts stay fp32
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        inv = order.argsort()
        tok = order // k
        counts = torch.bincount(flat, minlength=A.shape[0]).tolist()
        xs = x.index_select(0, tok)
        s = scale[flat].index_select(0, order)[:, None].to(x.dtype)
        ws = w.reshape(-1).index_select(0, order)[:, None].to(x.dtype) * s
        h = _segment_mm(xs, A.transpose(1, 2), counts)  # (M, r)
        ys = _segment_mm(h * ws, B.transpose(1, 2), counts)  # (M, out)
        ctx.save_for_backward(xs, A, B, inv, tok, h, s, ws)
        ctx.counts, ctx.k = counts, k
        return _unsort(ys, inv, k)

    @staticmethod
    def backward(ctx, g):
        xs, A, B, inv, tok, h, s, ws = ctx.saved_tensors
        counts, k = ctx.counts, ctx.k
        gys = g.index_select(0, tok)  # each slot receives its token's output gradient
        ghw = _segment_mm(gys, B, counts)  # dL/d(w s h), (M, r)
        gh = ghw * ws
        gx = gA = gB = gw = None
        if ctx.needs_input_grad[0]:
            gx = _unsort(_segment_mm(gh, A, counts), inv, k)
        if ctx.needs_input_grad[1]:
            gA = torch.stack([ge.T @ xe for ge, xe in zip(gh.split(counts), xs.split(counts))])
        if ctx.needs_input_grad[2]:
            gB = torch.stack([ge.T @ he for ge, he in zip(gys.split(counts), (h * ws).split(counts))])
        if ctx.needs_input_grad[5]:
            gw = ((ghw * h).sum(1, keepdim=True) * s).index_select(0, inv).view(-1, k)
        return gx, gA, gB, None, None, gw


def routed_lora_sorted(x, A, B, scale, idx, w):
    return _SortedLoRA.apply(x, A, B, scale, idx, w)


# ----------------------------------------------------------------------------------------------------
# the pick

# From python kernels.py. On 2 CPU cores fused and sorted tie near E/k = 8: sorted from 16. On an H100
# (d 512, rank 16, 32k tokens) fused was faster at every E measured, up to 32: sorted only from 64,
# which nobody has timed.
SORTED_MIN_EXPERTS_PER_CHOICE = {"cpu": 16, "cuda": 64}


def pick(n_experts, k, device_type="cpu"):
    """The fused kernel does E/k times the needed work but in two large matmuls; the sorted one does
    only the needed work but pays per expert. Sorted once each token uses a small enough share of
    the experts (1/16 on CPU)."""
    threshold = SORTED_MIN_EXPERTS_PER_CHOICE.get(device_type, SORTED_MIN_EXPERTS_PER_CHOICE["cpu"])
    return routed_lora_sorted if n_experts >= threshold * k else routed_lora_fused


def routed_lora(x, A, B, scale, idx, w):
    return pick(A.shape[0], idx.shape[1], x.device.type)(x, A, B, scale, idx, w)


# ----------------------------------------------------------------------------------------------------
# check, then time: python kernels.py

def hard_top1(logits):
    """The method's routing: top-1 of softmax, unit weight with the straight-through gradient."""
    p = F.softmax(logits, -1)
    p_e, idx = p.max(-1, keepdim=True)
    return idx, 1 + (p_e - p_e.detach())  # exactly 1: (1 + p) - p would round off by an ulp


def soft_topk(logits, k, normalize):
    w, idx = F.softmax(logits, -1).topk(k, -1)
    return idx, (F.softmax(logits.gather(-1, idx), -1) if normalize else w)  # normalized: p[top-k] / sum p[top-k]


def check(fns, N, d_in, d_out, r, E, device):
    """Values and gradients (x, router logits, A, B) of each fn against the reference, hard and soft.
    Returns the largest absolute difference per fn; raises if any is off."""
    worst = {name: 0.0 for name in fns}
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)
    for mode in ("hard", "soft2", "soft2_norm"):
        x, logits = rand(N, d_in), rand(N, E)
        A, B, scale = rand(E, r, d_in) / math.sqrt(d_in), rand(E, d_out, r), rand(E).abs() + 0.5
        gy = rand(N, d_out)
        leaves = [t.requires_grad_() for t in (x, logits, A, B)]
        results = {}
        for name, fn in [("reference", routed_lora_reference)] + list(fns.items()):
            idx, w = hard_top1(logits) if mode == "hard" else soft_topk(logits, 2, mode.endswith("norm"))
            y = fn(x, A, B, scale, idx, w)
            results[name] = [y] + list(torch.autograd.grad(y, leaves, gy))
        for name in fns:
            for a, b in zip(results["reference"], results[name]):
                diff = (a - b).abs().max().item()
                worst[name] = max(worst[name], diff)
                if not diff <= 1e-4 * max(1.0, a.abs().max().item()):
                    raise SystemExit(f"MISMATCH: {name} differs from the reference by {diff:.3g} ({mode})")
    return worst


def bench(Es, d, r, n_tokens, iters, device):
    """fwd+bwd time (ms, median) of the plain MLP, the MLP with one LoRA, and the hard-routed MLP with
    each kernel at each E. Every round runs every variant once, in a rotating order, so a slow spell of
    a shared machine lands on all of them alike (the E=32 / E=2 ratio included)."""
    hidden = 16 * math.ceil(8 * d / 3 / 16)
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(device)
    base = {"gate": rand(hidden, d, std=0.02), "up": rand(hidden, d, std=0.02), "down": rand(d, hidden, std=0.02)}
    lora = lambda E: ({t: rand(E, r, W.shape[1], std=W.shape[1] ** -0.5) for t, W in base.items()},
                      {t: rand(E, W.shape[0], r, std=0.02) for t, W in base.items()})
    x = rand(n_tokens, d).requires_grad_()  # base, experts and the one LoRA frozen; x and the router train
    gy = rand(n_tokens, d)

    def swiglu(delta):  # one routing decision (or none) serves gate, up and down; down reads the post-activation h
        h = F.silu(F.linear(x, base["gate"]) + delta("gate", x)) * (F.linear(x, base["up"]) + delta("up", x))
        return F.linear(h, base["down"]) + delta("down", h)

    A1, B1 = lora(1)
    variants = {  # name: (forward, the tensors wanting gradients)
        "mlp": (lambda: F.linear(F.silu(F.linear(x, base["gate"])) * F.linear(x, base["up"]), base["down"]), [x]),
        "one_lora": (lambda: swiglu(lambda t, z: F.linear(F.linear(z, A1[t][0]), B1[t][0]) * 2.0), [x]),
    }

    def routed(fn, router, A, B, scale):
        def f():
            idx, w = hard_top1(F.linear(x, router))
            return swiglu(lambda t, z: fn(z, A[t], B[t], scale, idx, w))
        return f

    for E in Es:
        router = rand(E, d, std=0.02).requires_grad_()
        A, B = lora(E)
        scale = torch.full((E,), 2.0, device=device)
        for name, fn in [("reference", routed_lora_reference), ("fused", routed_lora_fused),
                         ("fused_eager", _concat_ranks), ("sorted", routed_lora_sorted)]:
            variants[E, name] = (routed(fn, router, A, B, scale), [x, router])

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(key):
        f, inputs = variants[key]
        sync()
        t0 = time.perf_counter()
        torch.autograd.grad(f(), inputs, gy)
        sync()
        return time.perf_counter() - t0

    compile_s = {E: step((E, "fused")) for E in Es}  # first calls compile: gate/up share a graph, down has its own
    keys = list(variants)
    for key in keys:
        step(key)
    times = {key: [] for key in keys}
    for _ in range(iters):
        for key in keys:
            times[key].append(step(key))
        keys = keys[1:] + keys[:1]
    ms = {key: 1000 * statistics.median(ts) for key, ts in times.items()}
    rows = []
    for E in Es:
        row = {"E": E, **{f"{name}_ms": ms[E, name] for name in ("reference", "fused", "fused_eager", "sorted")}}
        row["pick"] = "sorted" if pick(E, 1, device.type) is routed_lora_sorted else "fused"
        row["pick_ms"] = row[f"{row['pick']}_ms"]
        row["fused_first_call_s"] = compile_s[E]
        rows.append(row)
    return hidden, ms["mlp"], ms["one_lora"], rows


def main():
    ap = Parser(description="Check the routed LoRA kernels against the reference, then time them "
                            "inside a hard-routed SwiGLU MLP (forward + backward).")
    ap.add_argument("--out_dir", default="out", rule="text")
    ap.add_argument("--n_tokens", type=int, default=4096, rule=">= 1", help="tokens per batch (batch * time)")
    ap.add_argument("--d_model", type=int, default=128, rule=">= 1")
    ap.add_argument("--rank", type=int, default=8, rule=">= 1")
    ap.add_argument("--experts", default="2,4,5,8,16,32", rule="list >= 1", help="numbers of experts")
    ap.add_argument("--iters", type=int, default=25, rule=">= 1", help="timed rounds (median reported)")
    ap.add_argument("--device", default="auto", rule="auto|cpu|cuda")
    ap.add_argument("--threads", type=int, default=0, rule=">= 0, 0: torch's default",
                    help="CPU threads (1 is steadier on a machine shared with other jobs)")
    args = ap.parse_args()
    global COMPILE
    if COMPILE is None:  # the benchmark times the compiled kernel on every device
        COMPILE = True
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # many E's, k's and shapes in one process; a training run has few
    Es = [int(e) for e in args.experts.split(",")]
    d, r = args.d_model, args.rank
    print(f"torch {torch.__version__} | device {device} | threads {torch.get_num_threads()} | compile {COMPILE}")

    # 1. check: values and gradients equal the reference's, hard and soft, both sides of the pick
    t0 = time.time()
    hidden = 16 * math.ceil(8 * d / 3 / 16)
    fns = {"fused": routed_lora_fused, "sorted": routed_lora_sorted, "routed_lora": routed_lora}
    worst = check(fns, 256, d, hidden, r, 8, device)
    for name, diff in check(fns, 256, d, hidden, r, 32, device).items():
        worst[name] = max(worst[name], diff)
    print("check vs reference (max abs diff, values and grads of x, logits, A, B; hard, soft top-2, normalized): "
          + ", ".join(f"{n} {v:.2e}" for n, v in worst.items()) + f" | OK ({time.time() - t0:.1f}s)")

    # 2. time
    print(f"timing fwd+bwd of a SwiGLU MLP {d}->{hidden}->{d} on {args.n_tokens} tokens, LoRA rank {r}, "
          f"median of {args.iters} interleaved rounds ...", flush=True)
    t0 = time.time()
    hidden, mlp_ms, one_lora_ms, rows = bench(Es, d, r, args.n_tokens, args.iters, device)
    print(f"plain MLP {mlp_ms:.2f} ms | MLP + one LoRA {one_lora_ms:.2f} ms | ({time.time() - t0:.0f}s)")
    print("hard-routed MLP, ms:")
    cols = ["reference", "fused", "fused_eager", "sorted"]
    print(f"{'E':>3} " + " ".join(f"{c:>11}" for c in cols)
          + f" {'pick':>13} {'pick/1LoRA':>10} {'fused 1st call s':>16}")
    for row in rows:
        print(f"{row['E']:>3} " + " ".join(f"{row[c + '_ms']:>11.2f}" for c in cols)
              + f" {row['pick']:>6} {row['pick_ms']:>6.2f} {row['pick_ms'] / one_lora_ms:>10.2f}"
              + f" {row['fused_first_call_s']:>16.1f}")

    # 3. the targets, measured as they are
    at = {row["E"]: row for row in rows}
    targets = {}

    def target(name, E_needed, value_fn, op, bound, text):
        if not all(E in at for E in E_needed):
            print(f"{text}: not measured (needs E in {E_needed})")
            return
        value = value_fn()
        ok = value <= bound if op == "<=" else value >= bound
        targets[name] = {"value": value, "target": f"{op} {bound}", "pass": ok}
        print(f"{text}: {value:.2f}x (target {op} {bound}x) {'PASS' if ok else 'MISS'}")

    target("fused_over_one_lora_E5", [5], lambda: at[5]["fused_ms"] / one_lora_ms, "<=", 1.10,
           "fused routed MLP / MLP with one LoRA, E=5")
    target("reference_over_fused_E8", [8], lambda: at[8]["reference_ms"] / at[8]["fused_ms"], ">=", 3.0,
           "reference / fused, E=8")
    target("pick_E32_over_E2", [2, 32], lambda: at[32]["pick_ms"] / at[2]["pick_ms"], "<=", 1.5,
           "routed_lora's pick, time(E=32) / time(E=2)")

    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "bench_kernels.json")
    result = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
              "compile": COMPILE, "n_tokens": args.n_tokens, "d_model": d, "hidden": hidden, "rank": r,
              "iters": args.iters, "check_max_abs_diff": worst, "mlp_ms": mlp_ms, "one_lora_ms": one_lora_ms,
              "rows": rows, "targets": targets}
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
