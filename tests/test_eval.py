"""eval.py: the measures on hand-made cases with known answers, the mixed verifier, the routing page in a
headless browser, and the whole smoke pipeline through the real command lines ending in eval.json."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from eval import (SWAPS, behavior_kl, concentration, confusion, expert_switches, fit_classifier, majority,
                  mixed_purity, purity, routing_page)
from lora import weighted_adapter
from tasks import DOMAINS, mixed_examples, score, verify_mixed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# the mixed verifier

def test_verify_mixed_right_half_right_wrong():
    ex = mixed_examples("test", 1)[0]  # add then bool: the first ordered pair
    (a1, a2), (c1, c2) = ex["answers"], ex["completion"].split(" | ")
    assert ex["domain"] == "add+bool"
    assert verify_mixed(ex["completion"], ex["answers"]) == 1.0 == score(ex, ex["completion"])
    assert verify_mixed(f"{c1} | steps #### {'no' if a2 == 'yes' else 'yes'}", ex["answers"]) == 0.0  # second wrong
    assert verify_mixed(f"steps #### 0 | {c2}", ex["answers"]) == 0.0  # first wrong
    assert verify_mixed("steps #### 0 | steps #### maybe", ex["answers"]) == 0.0  # both wrong
    assert verify_mixed(c1, ex["answers"]) == 0.0  # the second answer never came
    assert verify_mixed(f"{c2} | {c1}", ex["answers"]) == 0.0  # right answers, wrong order
    assert verify_mixed(f"{c1} | {c2} | {c2}", ex["answers"]) == 0.0  # a third part


# ---------------------------------------------------------------------------------------------
# the measures, by hand

def test_purity_by_hand():
    choice = torch.tensor([[0, 0, 1, 1],   # layer 0: 2 of 4 tokens to expert 0
                           [0, 1, 1, 1]])  # layer 1: 1 of 4
    overall, per_layer = purity(choice, 0)
    assert overall == pytest.approx(3 / 8) and per_layer == pytest.approx([0.5, 0.25])
    assert purity(choice, 1)[0] == pytest.approx(5 / 8)
    assert purity(choice, 2) == (0.0, [0.0, 0.0])


def test_mixed_purity_by_hand():
    choice = torch.tensor([[3, 3, 1, 1, 1],
                           [3, 1, 1, 1, 0]])
    # the first two tokens answer the question of expert 3, the rest that of expert 1
    assert mixed_purity(choice, 2, 3, 1) == pytest.approx(8 / 10)
    assert mixed_purity(choice, 5, 3, 1) == pytest.approx(3 / 10)  # no second part: all against expert 3


def test_majority_and_switches_by_hand():
    choice = torch.tensor([[0, 0, 1, 1, 2, 2, 0],
                           [0, 1, 1, 2, 2, 0, 1],
                           [1, 0, 1, 2, 0, 0, 2]])
    # per token: 0 0 1 2 2 0 and a three-way tie (0, 1, 2) that goes to the lowest id, 0
    assert majority(choice).tolist() == [0, 0, 1, 2, 2, 0, 0]
    assert expert_switches(choice) == 3
    assert expert_switches(torch.zeros(4, 9, dtype=torch.long)) == 0
    assert expert_switches(torch.tensor([[0, 1, 0, 1]])) == 3  # one layer: every change counts


def test_confusion_by_hand():
    choice = torch.tensor([[0, 0, 1, 2],
                           [0, 1, 1, 2],
                           [1, 1, 1, 0]])  # per token, the expert most layers chose: 0, 1, 1, 2
    assert majority(choice).tolist() == [0, 1, 1, 2]
    assert confusion(choice, 4) == pytest.approx([0.25, 0.5, 0.25, 0.0])


def test_classifier_separates_separable_prompts():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(3).repeat_interleave(20)
    x = centres[y] + torch.randn(60, 16, generator=g) * 0.5
    predict = fit_classifier(x, y, 3)
    assert predict(x) == y.tolist()
    assert predict(centres) == [0, 1, 2]
    shuffled = fit_classifier(x, y[torch.randperm(60, generator=g)], 3, steps=50)  # no signal: not perfect
    assert sum(a == b for a, b in zip(shuffled(x), y.tolist())) < 60


def test_concentration_by_hand():
    p = torch.tensor([[0.95, 0.05, 0.0], [0.5, 0.25, 0.25], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])
    mean_max, share = concentration(p)
    assert mean_max == pytest.approx((0.95 + 0.5 + 0.8 + 1.0) / 4) and share == pytest.approx(0.5)
    assert concentration(p.view(2, 2, 3)) == pytest.approx((mean_max, share))  # any leading shape


def test_behavior_kl_by_hand():
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    sys_ = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    # token 1: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3); token 2: identical, 0
    assert behavior_kl(ref, sys_) == pytest.approx(0.5 * math.log(4 / 3) / 2, rel=1e-5)
    assert behavior_kl(ref, ref) == pytest.approx(0.0, abs=1e-7)
    assert behavior_kl(sys_, ref) != pytest.approx(behavior_kl(ref, sys_))  # KL(expert || system), not symmetric


def test_merge_averages_A_and_B_separately():
    a = {"rank": 1, "alpha": 2.0, "targets": ["up"], "tensors": {"m.up.A": torch.tensor([[1.0, 0.0]]),
                                                                 "m.up.B": torch.tensor([[2.0]])}}
    b = {"rank": 1, "alpha": 2.0, "targets": ["up"], "tensors": {"m.up.A": torch.tensor([[0.0, 1.0]]),
                                                                 "m.up.B": torch.tensor([[4.0]])}}
    ad, _ = weighted_adapter([a, b], [0.5, 0.5])
    assert ad["tensors"]["m.up.A"].tolist() == [[0.5, 0.5]] and ad["tensors"]["m.up.B"].tolist() == [[3.0]]
    assert ad["alpha"] == 2.0 and ad["rank"] == 1  # applied at the experts' own scale
    ad, _ = weighted_adapter([a, b], [1.5, -1.0])  # LoRAHub's searched weights: A and B each weighted
    assert ad["tensors"]["m.up.A"].tolist() == [[1.5, -1.0]] and ad["tensors"]["m.up.B"].tolist() == [[-1.0]]
    ad, why = weighted_adapter([a, dict(b, rank=2)], [0.5, 0.5])
    assert ad is None and "rank" in why


# ---------------------------------------------------------------------------------------------
# the routing page in a headless browser

def test_routing_page_draws_coloured_tokens_in_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed")
    samples = [{"title": "add+hop #0", "prompt": "add 1+2 | hop f a\n", "right": True, "tokens": list("1#</script>3"),
                "layers": [[0] * 5 + [1] * 7, [0] * 3 + [1] * 9], "majority": [0] * 5 + [1] * 7,
                "pmax": [[0.9] * 12, [0.6] * 12]}]
    path = tmp_path / "routing.html"
    routing = {"confusion": {"add": [0.75, 0.25], "hop": [0.1, 0.9]}, "purity": {"add": 0.7, "hop": 0.8},
               "decisive": {"add": 0.95}}
    path.write_text(routing_page(["add", "hop"], 2, samples, routing))

    def tokens_after_js(url):
        r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
                           capture_output=True, text=True, timeout=120)
        found = re.findall(r'<span class="tok"[^>]*? style="background: (rgb\([^)]*\));"[^>]*>([^<]*)</span>', r.stdout)
        assert len(found) == 12, r.stdout[-2000:]
        return r.stdout, found

    add, hop = "rgb(230, 159, 0)", "rgb(86, 180, 233)"  # #E69F00 and #56B4E9
    dom, tokens = tokens_after_js(path.as_uri())  # the majority view
    assert [c for c, _ in tokens] == [add] * 5 + [hop] * 7
    assert "".join(t for _, t in tokens) == "1#&lt;/script&gt;3"  # text, never markup
    assert "expert 0: add" in dom and "expert 1: hop" in dom and '<option value="1">layer 1</option>' in dom
    # the confusion table: a row per domain, a column per expert, then purity and decisive purity
    rows = re.findall(r"<tr>(.*?)</tr>", dom)
    cells = [re.findall(r"<t[dh][^>]*>([^<]*)</t[dh]>", r) for r in rows]
    assert cells == [["domain", "→ add", "→ hop", "purity", "decisive"], ["add", "0.75", "0.25", "0.70", "0.95"],
                     ["hop", "0.10", "0.90", "0.80", "—"]]
    _, tokens = tokens_after_js(path.as_uri() + "#1")  # the layer selector, set through the URL
    assert [c for c, _ in tokens] == [add] * 3 + [hop] * 9


# ---------------------------------------------------------------------------------------------
# the whole smoke pipeline, every stage through its own command line

def smoke_pipeline(out):
    """`bash run.sh smoke` into `out`, three stages at a time (the default on 2 cores) with one thread
    each; returns its stdout."""
    # NANOMOR_COMPILE=0: compiling the routed kernel for each new tiny shape costs more than it saves here
    env = dict(os.environ, OUT_DIR=out, PYTHON=sys.executable, OMP_NUM_THREADS="1", NANOMOR_COMPILE="0", JOBS="3")
    r = subprocess.run(["bash", "run.sh", "smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"run.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smoke"))
    return out, smoke_pipeline(out)


def test_smoke_pipeline_writes_eval_json(smoke):
    out, log = smoke
    assert "| system |" in log and "total wall time" in log

    res = json.load(open(os.path.join(out, "eval.json")))
    systems = (["base"] + [f"expert:{d}" for d in DOMAINS] + [f"sft:{d}" for d in DOMAINS] +
               ["merge", "lorahub", "seq_router", "oracle", "arrow", "mor_hard", "mor_paper", "router_only", "mor_gumbel",
                "mor_soft", "moe_soft", "attn_only", "attn_fast"] + [f"mor_hard+{s}" for s in SWAPS])
    assert res["preset"] == "smoke" and res["seed"] == 0 and res["n_test"] == 8 and res["domains"] == DOMAINS
    assert list(res["accuracy"]) == systems and list(res["params"]) == systems and not res["skipped"]
    for s, acc in res["accuracy"].items():
        assert list(acc) == DOMAINS + ["mixed"]
        for d, a in acc.items():
            own_only = s.startswith(("expert:", "sft:"))  # an expert is scored on its own domain only
            if (s in ("oracle", "mor_hard+oracle") and d == "mixed") or (own_only and d != s.split(":")[1]):
                assert a is None  # no one expert for mixed prompts
            else:
                assert 0.0 <= a <= 1.0 and a * 8 == int(a * 8)  # a share of the 8 prompts
    assert all(res["accuracy"]["oracle"][d] == res["accuracy"][f"expert:{d}"][d] for d in DOMAINS)
    for s, p in res["params"].items():
        assert isinstance(p["trainable"], int) and isinstance(p["total"], int) and 0 <= p["trainable"] <= p["total"]
    assert res["params"]["base"]["trainable"] == 0
    assert 0 < res["params"]["mor_hard"]["trainable"] < res["params"]["moe_soft"]["trainable"]
    assert res["params"]["seq_router"]["trainable"] == res["seq_router_classifier"]["params"] == 5 * 32 + 5
    assert res["params"]["arrow"]["trainable"] == 0 and res["params"]["router_only"]["trainable"] == 5 * 32
    assert res["params"]["attn_only"]["trainable"] == res["params"]["mor_hard"]["trainable"] - 5 * 32
    assert all(res["params"][f"mor_hard+{s}"] == res["params"]["mor_hard"] for s in SWAPS)
    assert all(sum(v.values()) == 8 for d, v in res["seq_router_votes"].items())  # one pick per prompt
    assert all(0.0 <= a <= 1.0 for a in res["seq_router_classifier"]["test_accuracy"].values())
    assert list(res["routing"]) == ["arrow", "mor_hard", "mor_paper", "router_only", "mor_gumbel", "mor_soft", "moe_soft"]
    assert res["params"]["lorahub"]["trainable"] == 5 and res["params"]["lorahub"]["total"] == res["params"]["merge"]["total"]
    assert list(res["lorahub_weights"]) == DOMAINS and all(-1.5 <= w <= 1.5 for w in res["lorahub_weights"].values())
    for r in res["routing"].values():
        assert list(r["confusion"]) == DOMAINS and all(sum(row) == pytest.approx(1.0) for row in r["confusion"].values())
        assert all(0.0 <= x <= 1.0 for x in r["decisive"].values())
        assert list(r["purity"]) == DOMAINS and all(0.0 <= x <= 1.0 for x in r["purity"].values())
        assert all(len(layers) == 2 for layers in r["purity_per_layer"].values())  # smoke: 2 layers
        assert 0.0 < r["max_weight_mean"] <= 1.0 and 0.0 <= r["max_weight_gt_0.9"] <= 1.0
        assert r["switches_per_mixed_answer"] >= 0.0
    assert set(res["behavior_kl"]) == set(systems)
    for s, kl in res["behavior_kl"].items():
        assert list(kl) == ([s.split(":")[1]] if s.startswith(("expert:", "sft:")) else DOMAINS) and all(x >= -1e-6 for x in kl.values())
    assert all(abs(res["behavior_kl"][f"expert:{d}"][d]) < 1e-6 for d in DOMAINS)  # an expert against itself
    assert set(systems) - {"oracle"} <= set(res["seconds"]) and res["seconds"]["total"] > 0
    report = open(os.path.join(out, "report.md")).read()
    assert "## Accuracy" in report and "| mor_hard |" in report and "## Behaviour preservation" in report
    page = open(os.path.join(out, "routing.html")).read()
    assert "<script" in page and '"samples"' in page and "src=" not in page and "href=" not in page  # self-contained
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


RL_ORDER = ("ok", "pick", "bool", "hop", "add")
ROUTERS = ["mor_gumbel", "mor_hard", "router_only", "mor_paper", "mor_soft", "lorahub", "attn_fast", "moe_soft", "attn_only"]
STAGES = (["pretrain"] + [f"expert:{d}" for d in RL_ORDER] + [f"distill:{d}" for d in RL_ORDER] + ROUTERS +
          [f"sft:{d}" for d in DOMAINS] + ["eval"])


def test_run_sh_times_every_stage_then_skips_them_all(smoke):
    out, log = smoke
    times = open(os.path.join(out, "times.txt")).read().splitlines()
    assert [line.split()[0] for line in times[1:-1]] == STAGES and times[-1].startswith("  total ")
    assert len(re.findall(r"^== \S+ started", log, re.M)) == len(STAGES)
    # each domain's distillation starts after its RLVF expert, the routers after every distillation, eval last
    order = [m.group(1) for m in re.finditer(r"^== (\S+) (?:started|done)", log, re.M)]
    started, done = (lambda s: order.index(s)), (lambda s: len(order) - 1 - order[::-1].index(s))
    assert all(done(f"expert:{d}") < started(f"distill:{d}") for d in DOMAINS)
    assert all(done(f"distill:{d}") < started(r) for d in DOMAINS for r in ROUTERS)
    assert all(done(s) < started("eval") for s in STAGES[:-1])

    again = subprocess.run(["bash", "run.sh", "smoke"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, OUT_DIR=out, PYTHON=sys.executable))
    assert again.returncode == 0 and again.stdout.count("exists, skipped") == len(STAGES)
    assert "started" not in again.stdout


def test_run_sh_stops_at_the_first_failing_stage(tmp_path):
    (tmp_path / "base.pt").write_text("not a checkpoint")  # pretrain counts as done; every expert fails on it
    r = subprocess.run(["bash", "run.sh", "smoke"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OUT_DIR=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1"))
    assert r.returncode == 1
    assert re.match(r"error: stage 'expert:(ok|pick|bool)' failed \(exit 2\)", r.stderr), r.stderr
    assert "is not a readable base model" in r.stderr  # the stage's own error line, from the end of its log
    assert "== distill:" not in r.stdout and not list(tmp_path.glob("experts/*.pt"))
    assert (tmp_path / "base.pt").read_text() == "not a checkpoint"  # nothing lost


def test_seeds_run_side_by_side_and_seed_0_is_the_plain_run(smoke, tmp_path):
    """run.sh --seeds 2: seeds 0 and 1, each pipeline from scratch, then summary.py. Seed 0 gives the
    plain run's results to the last bit (same preset, seed and threads); seed 1 another pipeline."""
    env = dict(os.environ, OUT_DIR=str(tmp_path), PYTHON=sys.executable, NANOMOR_COMPILE="0", CORES="2", JOBS="3")
    r = subprocess.run(["bash", "run.sh", "smoke", "--seeds", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"run.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    first, again, other = (json.load(open(os.path.join(out, "eval.json")))
                           for out in (smoke[0], str(tmp_path / "seed_0"), str(tmp_path / "seed_1")))
    assert again["accuracy"] == first["accuracy"]
    # smoke accuracies are mostly 0, so the finer measures are the sharper check: the same routing and
    # the same behaviour KL, to the last bit
    assert again["routing"] == first["routing"] and again["behavior_kl"] == first["behavior_kl"]
    assert other["behavior_kl"] != first["behavior_kl"]  # another seed: another base, experts and routers
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["seeds"] == [0, 1] and "## Accuracy" in (tmp_path / "summary.md").read_text()
    for s, per_domain in summary["accuracy"].items():
        for d, st in per_domain.items():
            want = [first["accuracy"][s].get(d), other["accuracy"][s].get(d)]
            if d != "mean":
                assert st["values"] == want
            assert st["mean"] == pytest.approx(sum(st["values"]) / 2)
            assert st["std"] == pytest.approx(abs(st["values"][0] - st["values"][1]) / math.sqrt(2))
    gain = summary["targets"]["RLVF gain, expert:add - base"]["values"]
    assert gain == [r["accuracy"]["expert:add"]["add"] - r["accuracy"]["base"]["add"] for r in (first, other)]


def test_eval_jobs_side_by_side_write_the_serial_eval_json(smoke, tmp_path):
    """eval.py --jobs 2 (forked workers, one thread each, systems finishing in any order) writes the
    eval.json of the serial run: the same measures to the last bit, in the same order."""
    out = tmp_path / "out"
    shutil.copytree(smoke[0], out, ignore=shutil.ignore_patterns("eval.json", "report.md", "routing.html"))
    r = subprocess.run([sys.executable, "eval.py", "--preset", "smoke", "--out_dir", str(out), "--jobs", "2"], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1", NANOMOR_COMPILE="0"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    serial, parallel = (json.load(open(os.path.join(o, "eval.json"))) for o in (smoke[0], out))
    for key in ("accuracy", "params", "routing", "behavior_kl", "seq_router_votes", "lorahub_weights", "switches"):
        assert parallel[key] == serial[key] and list(parallel[key]) == list(serial[key]), key
    assert (out / "routing.html").read_text() == open(os.path.join(smoke[0], "routing.html")).read()


def test_missing_base_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "eval.py", "--preset", "smoke", "--out_dir", str(tmp_path)], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: base model not found: {tmp_path / 'base.pt'}"]


def test_diagnose_forces_each_part_and_finds_lost_prompts(smoke):
    # diagnose.py's per-token forcing, one expert for both parts, answers as that expert forced on the
    # whole sequence does (the same loop, the same shapes); then both commands end to end on the smoke run
    import copy
    from common import load_base
    from diagnose import answer
    from router import forced_experts, load_mor
    from tasks import MAX_NEW_TOKENS_MIXED
    out, _ = smoke
    base, enc, ckpt = load_base(out, "cpu")
    model = load_mor(os.path.join(out, "mor", "mor_hard.pt"), copy.deepcopy(base), ckpt).eval()
    prompts = [e["prompt"] for e in mixed_examples("test", 3)]
    for e in (0, 3):
        with forced_experts(model, e):
            want = [answer(model, enc, p, MAX_NEW_TOKENS_MIXED) for p in prompts]
        assert [answer(model, enc, p, MAX_NEW_TOKENS_MIXED, (e, e)) for p in prompts] == want
    assert model.router.forced is None
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "diagnose.py", "mixed", "--out_dir", out, "--n", "4"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^all +\| router \d/\d/\d of 4 \| oracle \d/\d/\d of 4$", r.stdout, re.M), r.stdout
    r = subprocess.run([sys.executable, "diagnose.py", "lost", "--out_dir", out, "--domain", "add", "--n", "8"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and re.search(r"mor_hard loses \d+ of the first 8 add test prompts", r.stdout), r.stderr
    r = subprocess.run([sys.executable, "diagnose.py", "heldout", "--out_dir", out, "--n", "4"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and len(re.findall(r"^\w+ +\| mor_hard \d \| expert:\w+ \d \| of 4 \| ratio", r.stdout, re.M)) == 5, \
        r.stdout + r.stderr
    r = subprocess.run([sys.executable, "diagnose.py", "lost", "--out_dir", out, "--system", "nope"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
