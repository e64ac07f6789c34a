import json
import os
import subprocess
import sys

import pytest
import torch

from common import fingerprint, load_base
from tasks import get_tokenizer, tokenizer_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_smoke_pretraining_loss_falls_and_checkpoint_is_complete(tmp_path, optimizer):
    r = run("pretrain.py", "--preset", "smoke", "--out_dir", str(tmp_path), "--steps", "40", "--eval_n", "2",
            "--optimizer", optimizer)
    assert r.returncode == 0, r.stderr
    assert "base add" in r.stdout and "wall time" in r.stdout
    assert os.listdir(tmp_path) == ["base.pt"]  # written atomically: no temporary file left behind
    model, enc, ckpt = load_base(str(tmp_path), "cpu")
    losses = ckpt["metrics"]["loss"]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert ckpt["fingerprint"] == fingerprint(model.state_dict())
    assert ckpt["tokenizer"] == tokenizer_info(get_tokenizer())
    assert ckpt["train_config"]["steps"] == 40
    assert set(ckpt["metrics"]["accuracy"]) == {"add", "bool", "pick", "ok", "hop", "mixed"}


def test_bad_input_is_one_clear_line(tmp_path):
    cases = [(["--preset", "huge"], "--preset must be one of"),
             (["--preset", "smoke", "--bogus", "1"], "unrecognized arguments"),
             (["--preset", "smoke", "--lr", "fast"], "invalid float"),
             (["--preset", "smoke", "--steps", "-1"], "--steps must be >= 1"),
             (["--preset", "smoke", "--out_dir", "/proc/forbidden"], "cannot write")]
    for args, msg in cases:
        r = run("pretrain.py", *args)
        assert r.returncode != 0, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)


def test_missing_or_corrupt_base_is_refused(tmp_path):
    r = run("train_expert.py", "--preset", "smoke", "--out_dir", str(tmp_path), "--domain", "add")
    assert r.returncode != 0 and "base model not found" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "base.pt").write_bytes(b"not a checkpoint at all")
    r = run("train_expert.py", "--preset", "smoke", "--out_dir", str(tmp_path), "--domain", "add")
    assert r.returncode != 0 and "not a readable base model" in r.stderr and "Traceback" not in r.stderr
    torch.save({"something": 1}, tmp_path / "base.pt")
    r = run("train_expert.py", "--preset", "smoke", "--out_dir", str(tmp_path), "--domain", "add")
    assert r.returncode != 0 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_bench_pretrain_times_batch_making_and_the_step(tmp_path):
    r = run("bench_pretrain.py", "--preset", "smoke", "--out_dir", str(tmp_path), "--batches", "2")
    assert r.returncode == 0, r.stderr
    res = json.load(open(os.path.join(tmp_path, "bench_pretrain.json")))
    assert res["sample_encode_ms"] > 0 and res["pad_copy_ms"] > 0
    for name in ("eager", "eager_read_loss"):  # smoke does not compile
        assert res[name]["ms"] > 0 and res[name]["tflops"] > 0
    assert "compiled" not in res and res["batches"] == 2
    r = run("bench_pretrain.py", "--preset", "smoke", "--out_dir", str(tmp_path), "--batches", "0")
    assert r.returncode == 2 and r.stderr.strip() == "error: --batches must be >= 1 (got 0)"
