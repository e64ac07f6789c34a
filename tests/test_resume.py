"""Kill a training run with SIGKILL mid-way, resume it, and check it ends where an uninterrupted run ends."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from common import load_base, load_checkpoint, save_atomic
from lora import load_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# NANOMOR_COMPILE=0: compiling the routed kernel for tiny shapes costs more than the steps it speeds up
ENV = dict(os.environ, OMP_NUM_THREADS="1", NANOMOR_COMPILE="0")


def cmd(script, out, *extra):
    return [sys.executable, script, "--preset", "smoke", "--out_dir", str(out), *extra]


def kill_after_checkpoint(args, ckpt):
    """Start a run, SIGKILL it as soon as its first checkpoint is on disk."""
    p = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not os.path.exists(ckpt) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.exists(ckpt), "no checkpoint was written before the run ended"


def finish(args):
    r = subprocess.run(args + ["--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def no_temp_files(folder):
    return not [f for _, _, fs in os.walk(folder) for f in fs if f.endswith(".tmp")]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_pretrain_resumes_after_sigkill(tmp_path, optimizer):
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ("--steps", "60", "--ckpt_every", "10", "--eval_n", "2", "--optimizer", optimizer)
    subprocess.run(cmd("pretrain.py", a, *flags), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    kill_after_checkpoint(cmd("pretrain.py", b, *flags), b / "pretrain.ckpt.pt")
    # a state written before tasks.py changed would go on training on other data: refused, and left as it was
    ckpt, kept = b / "pretrain.ckpt.pt", tmp_path / "kept.pt"
    shutil.copy(ckpt, kept)
    save_atomic(dict(load_checkpoint(str(ckpt)), tasks="0123456789abcdef"), str(ckpt))
    r = subprocess.run(cmd("pretrain.py", b, *flags, "--resume"), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "other task definitions" in r.stderr
    shutil.copy(kept, ckpt)
    out = finish(cmd("pretrain.py", b, *flags))
    assert "resuming from" in out
    assert sorted(os.listdir(b)) == ["base.pt"] and no_temp_files(b)
    _, _, ca = load_base(str(a), "cpu")
    _, _, cb = load_base(str(b), "cpu")
    assert ca["metrics"]["loss"] == cb["metrics"]["loss"]  # same data, same RNG: the same run
    assert ca["fingerprint"] == cb["fingerprint"]


def test_expert_resumes_after_sigkill(tmp_path):
    subprocess.run(cmd("pretrain.py", tmp_path, "--steps", "20", "--eval_n", "2"), cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=300)
    flags = ("--domain", "add", "--method", "sft", "--sft_steps", "30", "--ckpt_every", "5", "--eval_every", "100")
    kill_after_checkpoint(cmd("train_expert.py", tmp_path, *flags), tmp_path / "experts" / "add_sft.ckpt.pt")
    out = finish(cmd("train_expert.py", tmp_path, *flags))
    assert "resuming from" in out and "step 30/30" in out
    assert os.listdir(tmp_path / "experts") == ["add_sft.pt"] and no_temp_files(tmp_path)
    _, _, base = load_base(str(tmp_path), "cpu")
    ad = load_adapter(str(tmp_path / "experts" / "add_sft.pt"), base)
    assert len(ad["meta"]["metrics"]["curve"]) == 30
    r = subprocess.run(cmd("train_expert.py", tmp_path, *flags[:4], "--sft_steps", "31", "--resume"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 0  # no checkpoint left: a fresh start, said so
    assert "starting from scratch" in r.stdout


def test_router_resumes_after_sigkill(tmp_path):
    run = lambda *a: subprocess.run(cmd(*a), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    run("pretrain.py", tmp_path, "--steps", "10", "--eval_n", "2", "--pass_k", "0")
    run("train_expert.py", tmp_path, "--domain", "add", "--steps", "1", "--eval_n", "2")
    run("distill.py", tmp_path, "--domains", "add", "--n_prompts", "4", "--samples", "1")
    flags = ("--domains", "add", "--steps", "40", "--ckpt_every", "5", "--eval_n", "2")
    run("train_router.py", tmp_path, *flags, "--name", "whole")
    killed = cmd("train_router.py", tmp_path, *flags, "--name", "killed")
    kill_after_checkpoint(killed, tmp_path / "mor" / "killed.ckpt.pt")
    out = finish(killed)
    assert "resuming from" in out
    assert sorted(os.listdir(tmp_path / "mor")) == ["killed.pt", "whole.pt"] and no_temp_files(tmp_path)
    a, b = (load_checkpoint(str(tmp_path / "mor" / f"{n}.pt")) for n in ("whole", "killed"))
    assert a["meta"]["metrics"]["loss"] == b["meta"]["metrics"]["loss"]  # the same run, interrupted or not
    assert torch.equal(a["router"], b["router"])
    assert all(torch.equal(a["attn_lora"][k], b["attn_lora"][k]) for k in a["attn_lora"])
