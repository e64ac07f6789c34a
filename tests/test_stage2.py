"""Stage 2 end to end on the smoke preset, through the real command lines:
pretrain -> train_expert -> distill -> train_router -> load the MoR file.
Two domains (one real one-step expert, one synthetic) keep it to about half a minute, most of it
process start-up."""
import json
import os
import subprocess
import sys

import pytest

from tasks import examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = ["add", "bool"]


def run(*args):
    # NANOMOR_COMPILE=0: at these sizes compiling the kernel for each new batch shape costs far more
    # than the few steps it would speed up
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOMOR_COMPILE="0")
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stage2"))
    run("pretrain.py", "--preset", "smoke", "--out_dir", out, "--eval_n", "2", "--pass_k", "0")
    run("train_expert.py", "--preset", "smoke", "--out_dir", out, "--domain", "add", "--steps", "1", "--eval_n", "2")
    # the second expert is synthetic (random B), written in-process: one process start fewer
    import torch
    from common import load_base
    from lora import EXPERT_TARGETS, attach, save_adapter
    model, _, base_ckpt = load_base(out, "cpu")
    torch.manual_seed(0)
    for layer in attach(model, EXPERT_TARGETS, 2, 4.0).values():
        torch.nn.init.normal_(layer.B, std=0.05)
    save_adapter(os.path.join(out, "experts", "bool.pt"), model, base_ckpt, domain="bool", method="synthetic")
    return out


def test_distill_then_train_router(out, monkeypatch):
    log = run("distill.py", "--preset", "smoke", "--out_dir", out, "--domains", ",".join(DOMAINS))
    for d in DOMAINS:
        assert f"distill {d}" in log and "kept" in log
        path = os.path.join(out, "distill", f"{d}.jsonl")
        rows = [json.loads(line) for line in open(path)]
        assert rows  # the smoke preset's --gold_fallback: gold router-split traces when no trace verified
        for r in rows:
            assert r["domain"] == d and r["source"] in ("greedy", "sample", "gold")
        assert len({r["source"] == "gold" for r in rows}) == 1  # gold only stands in for an empty yield
    log = run("train_router.py", "--preset", "smoke", "--out_dir", out, "--domains", ",".join(DOMAINS),
              "--steps", "3", "--eval_n", "2")
    assert "trainable" in log and "expert alone" in log
    path = os.path.join(out, "mor", "mor_hard.pt")
    assert os.path.exists(path)

    import torch
    import kernels
    from common import load_base
    from router import load_mor
    monkeypatch.setattr(kernels, "COMPILE", False)  # as in the scripts above
    base, enc, base_ckpt = load_base(out, "cpu")
    model = load_mor(path, base, base_ckpt)
    assert [x["domain"] for x in model.router.expert_info] == DOMAINS
    logits, _ = model(torch.tensor([[256, 97, 100]]))
    assert logits.shape == (1, 3, 259)


def test_distill_answers_a_repeated_prompt_greedily_once(monkeypatch):
    from types import SimpleNamespace
    import distill
    from common import encode_example
    from tasks import get_tokenizer
    enc = get_tokenizer()
    eos = enc.encode_single_token("<|eos|>")
    a, b = examples("add", "router", 2, seed=0)
    monkeypatch.setattr(distill, "examples", lambda *_: [a, b, a, a, b])  # as a small domain draws them
    asked = []

    class GoldExpert:
        def generate(self, prompts, max_new_tokens, eos_id, pad_id, temperature=0.0, generator=None):
            asked.extend(prompts)
            return [enc.encode_ordinary(ex["completion"]) + [eos] for ex in (a, b)]

    args = SimpleNamespace(n_prompts=5, samples=0, temperature=1.0, seed=0, batch_size=256)
    rows, n = distill.distill_domain(GoldExpert(), enc, "add", args, None)
    assert asked == [encode_example(enc, ex["prompt"])[0] for ex in (a, b)]  # each distinct prompt once, in order
    assert [r["prompt"] for r in rows] == [a["prompt"], b["prompt"]]
    assert n == {"distinct": 2, "generated": 2, "kept": 2, "no_eos": 0, "wrong": 0, "duplicate": 3}


def test_malformed_trace_line_is_named(tmp_path, capsys):
    from common import read_traces
    (tmp_path / "add.jsonl").write_text('{"domain": "add", "prompt": "p", "completion": "c"}\n{"domain": oops\n')
    with pytest.raises(SystemExit):
        read_traces(str(tmp_path), ["add"])
    assert f"{tmp_path / 'add.jsonl'}:2: malformed JSON" in capsys.readouterr().err


def test_distill_keeps_only_finished_verified_unique_traces():
    from types import SimpleNamespace
    from distill import distill_domain
    from tasks import get_tokenizer
    enc = get_tokenizer()
    eos = enc.encode_single_token("<|eos|>")
    exs = examples("add", "router", 2, seed=0)
    gold = [enc.encode_ordinary(ex["completion"]) for ex in exs]
    wrong = enc.encode_ordinary("1+1=2 #### 0")

    class FakeExpert:  # greedy: right for both prompts; samples: a copy, unfinished, wrong, right again
        def generate(self, prompts, max_new_tokens, eos_id, pad_id, temperature=0.0, generator=None):
            if temperature == 0.0:
                return [g + [eos] for g in gold]
            return [gold[0] + [eos], gold[0], wrong + [eos], gold[1] + [eos]]

    args = SimpleNamespace(n_prompts=2, samples=2, temperature=1.0, seed=0, batch_size=256)
    rows, n = distill_domain(FakeExpert(), enc, "add", args, None)
    assert n == {"distinct": 2, "generated": 6, "kept": 2, "no_eos": 1, "wrong": 1, "duplicate": 2}
    assert [r["source"] for r in rows] == ["greedy", "greedy"]
    assert [r["completion"] for r in rows] == [ex["completion"] for ex in exs]


def test_sweep_trains_each_point_on_that_many_traces(out):
    """sweep.py through its command line: every (system, traces) point trained once, on the first N
    distinct traces per domain, its accuracy read back into the table and the picture; a rerun trains nothing."""
    if not os.path.exists(os.path.join(out, "distill", "add.jsonl")):
        run("distill.py", "--preset", "smoke", "--out_dir", out, "--domains", ",".join(DOMAINS))
    flags = ["--preset", "smoke", "--out_dir", out, "--traces", "1,0", "--systems", "mor_hard,attn_only", "--jobs", "2",
             "--n_test", "2"]
    log = run("sweep.py", *flags)
    assert log.count("started") == 4 and "| mor_hard |" in log and "| attn_only |" in log
    res = json.load(open(os.path.join(out, "sweep.json")))
    assert res["traces"] == [1, 0] and set(res["mean"]) == {"mor_hard", "attn_only"}
    assert all(0.0 <= a <= 1.0 for row in res["mean"].values() for a in row.values())
    assert open(os.path.join(out, "sweep.svg")).read().startswith("<svg")
    first = open(os.path.join(out, "sweep", "mor_hard_t1.log")).read()
    assert "traces add   | 1 of" in first and "traces bool  | 1 of" in first
    assert "started" not in run("sweep.py", *flags)  # every point is there already
