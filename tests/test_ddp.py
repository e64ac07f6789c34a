"""The training scripts under torchrun: 2 CPU processes (gloo) on the smoke preset, each stage writing a
file that loads. About 25 s, most of it process start-up."""
import os
import subprocess
import sys

from common import load_base, load_checkpoint
from lora import load_adapter
from router import load_mor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", NANOMOR_COMPILE="0")


def run(*args, nproc=2):
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    r = subprocess.run([sys.executable, *launch, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout


def test_smoke_stages_under_torchrun(tmp_path):
    common = ["--preset", "smoke", "--out_dir", str(tmp_path)]
    log = run("pretrain.py", *common, "--steps", "10", "--eval_n", "2", "--pass_k", "0")
    assert log.count("wrote ") == 1  # rank 0 alone prints and writes
    _, _, base = load_base(str(tmp_path), "cpu")
    assert base["train_config"]["batch_size"] == 16  # the global batch, 8 per rank
    run("train_expert.py", *common, "--domain", "add", "--steps", "2", "--eval_n", "2")
    ad = load_adapter(str(tmp_path / "experts" / "add.pt"), base)
    assert len(ad["meta"]["metrics"]["curve"]) == 2
    run("distill.py", *common, "--domains", "add", "--n_prompts", "4", "--samples", "1", nproc=0)
    run("train_router.py", *common, "--domains", "add", "--steps", "4", "--eval_n", "2")
    model, _, base = load_base(str(tmp_path), "cpu")
    load_mor(str(tmp_path / "mor" / "mor_hard.pt"), model, base)
    assert len(load_checkpoint(str(tmp_path / "mor" / "mor_hard.pt"))["meta"]["metrics"]["loss"]) == 4
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith((".tmp", ".ckpt.pt"))]


def test_batch_must_split_over_ranks(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "pretrain.py", "--preset", "smoke", "--out_dir", str(tmp_path), "--batch_size", "15"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "error: --batch_size 15 does not split evenly over 2 processes" in r.stderr
