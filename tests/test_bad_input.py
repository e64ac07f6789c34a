"""Every bad input of issue 7, one table: each gets one line on stderr starting with `error:`, a non-zero
exit, no traceback, and leaves every earlier output as it was.

Also covered elsewhere: a malformed trace line at the function level (test_stage2), a missing base for
eval.py (test_eval), a resume state written with other settings (test_resume)."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

from common import encode_example, fingerprint, generate_text, load_base, load_checkpoint, save_atomic
from lora import EXPERT_TARGETS, attach, save_adapter
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", NANOMOR_COMPILE="0")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Smoke outputs every case starts from: base.pt and one (synthetic) expert, experts/add.pt."""
    out = str(tmp_path_factory.mktemp("smoke"))
    subprocess.run([sys.executable, "pretrain.py", "--preset", "smoke", "--out_dir", out, "--steps", "5",
                    "--eval_n", "1", "--pass_k", "0"], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    model, _, base_ckpt = load_base(out, "cpu")
    torch.manual_seed(0)
    attach(model, EXPERT_TARGETS, 2, 4.0)
    save_adapter(os.path.join(out, "experts", "add.pt"), model, base_ckpt, domain="add", method="synthetic")
    return out


# how a case prepares its own folder (tmp) from the shared outputs (out); the shared ones are never touched

def copy(tmp, out):
    shutil.copytree(out, tmp, dirs_exist_ok=True)


def write_base(tmp, out, **shape):
    """A copy whose base.pt is another model: other weights, or with **shape, other shapes too."""
    copy(tmp, out)
    ckpt = load_checkpoint(os.path.join(out, "base.pt"))
    config = GPTConfig(**{**ckpt["model_config"], **shape})
    torch.manual_seed(1)
    state = GPT(config).state_dict()
    save_atomic(dict(ckpt, model=state, model_config=vars(config), fingerprint=fingerprint(state)),
                os.path.join(tmp, "base.pt"))


def other_base(tmp, out):
    write_base(tmp, out)


def narrow_base(tmp, out):
    write_base(tmp, out, n_embd=16)


def truncated_expert(tmp, out):
    copy(tmp, out)
    path = os.path.join(tmp, "experts", "add.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def base_of_other_tasks(tmp, out):
    """base.pt as it would be after an edit of tasks.py: pretrained on what the domains generated before."""
    copy(tmp, out)
    ckpt = load_checkpoint(os.path.join(out, "base.pt"))
    save_atomic(dict(ckpt, tasks="0123456789abcdef"), os.path.join(tmp, "base.pt"))


def text_base(tmp, out):
    copy(tmp, out)
    open(os.path.join(tmp, "base.pt"), "w").write("this is not a checkpoint\n")


def bad_trace_line(tmp, out):
    copy(tmp, out)
    os.makedirs(os.path.join(tmp, "distill"))
    open(os.path.join(tmp, "distill", "add.jsonl"), "w").write(
        '{"domain": "add", "prompt": "p", "completion": "c"}\n{"domain": "add", oops\n')


def read_only(tmp, out):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder anyway")
    os.chmod(tmp, 0o555)


# id, setup, command ({out}: the shared outputs, {tmp}: the case's own folder), what the line must name
CASES = [
    ("unknown_flag", None, "pretrain.py --out_dir {tmp} --bogus 1", "unrecognized arguments: --bogus"),
    ("bad_value", None, "pretrain.py --out_dir {tmp} --steps abc", "invalid int value: 'abc'"),
    ("negative_value", None, "pretrain.py --out_dir {tmp} --steps -3", "--steps must be >= 1 (got -3)"),
    ("unknown_preset", None, "pretrain.py --preset huge --out_dir {tmp}", "--preset must be one of smoke, cpu, gpu (got 'huge')"),
    ("missing_base", None, "train_expert.py --out_dir {tmp} --domain add", "base model not found"),
    ("missing_expert", None, "distill.py --out_dir {out} --domains add,bool", "no expert for domain bool"),
    ("missing_expert_router", None, "train_router.py --out_dir {out} --domains bool", "no expert for domain bool"),
    ("expert_of_another_base", other_base, "distill.py --out_dir {tmp} --domains add", "trained on another base"),
    ("expert_of_other_shapes", narrow_base, "distill.py --out_dir {tmp} --domains add", "base with other shapes"),
    ("truncated_checkpoint", truncated_expert, "distill.py --out_dir {tmp} --domains add",
     "is not a readable adapter"),
    ("base_of_other_tasks", base_of_other_tasks, "train_expert.py --out_dir {tmp} --domain add",
     "trained on other task definitions"),
    ("text_as_checkpoint", text_base, "train_expert.py --out_dir {tmp} --domain add", "is not a readable base model"),
    ("malformed_trace_line", bad_trace_line, "train_router.py --out_dir {tmp} --domains add",
     "add.jsonl:2: malformed JSON line"),
    # the CLI path to "longer than the context": a base whose context cannot hold the training sequences.
    # Generation refuses too-long prompts as well: test_generate_refuses_a_prompt_longer_than_the_context
    ("longer_than_context", None, "pretrain.py --out_dir {tmp} --block_size 48", "does not fit the model's context"),
    ("unknown_domain", None, "train_expert.py --out_dir {out} --domain nope", "--domain must be one of add, bool"),
    ("unwritable_output", read_only, "pretrain.py --out_dir {tmp}", "cannot write to output folder"),
    ("output_under_a_file", lambda tmp, out: open(os.path.join(tmp, "f"), "w").close(),  # fails for root too
     "pretrain.py --out_dir {tmp}/f/sub", "cannot write to output folder"),
    ("summary_of_a_missing_seed", None, "summary.py --out_dir {tmp} --seeds 0,1", "seed_0/eval.json not found"),
    ("sweep_unknown_system", None, "sweep.py --out_dir {out} --systems mor_hrad", "--systems must name some of"),
    ("non_finite_loss", None, "pretrain.py --out_dir {tmp} --lr 1e6 --ckpt_every 1", "training diverged"),
]


def hashes(folder):
    return {os.path.join(d, f): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(folder) for f in fs}


@pytest.mark.parametrize("name,setup,command,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(out, tmp_path, name, setup, command, message):
    tmp = str(tmp_path / "case")
    os.makedirs(tmp)
    if setup:
        setup(tmp, out)
    before = hashes(out), hashes(tmp)
    args = command.format(out=out, tmp=tmp).split()
    try:
        # --preset smoke first: a later --preset (the unknown_preset case) wins
        r = subprocess.run([sys.executable, args[0], "--preset", "smoke", *args[1:]], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(tmp, 0o755)
    lines = r.stderr.splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert hashes(out) == before[0]  # the shared outputs are intact
    if name == "non_finite_loss":  # stopped, and the last good checkpoint stays, loadable
        assert os.listdir(tmp) == ["pretrain.ckpt.pt"]
        assert load_checkpoint(os.path.join(tmp, "pretrain.ckpt.pt"))["step"] >= 1
    else:
        assert hashes(tmp) == before[1]


def test_generate_refuses_a_prompt_longer_than_the_context(out, capsys):
    model, enc, _ = load_base(out, "cpu")  # smoke: a context of 256 tokens
    with pytest.raises(SystemExit) as e:
        generate_text(model, enc, ["1+" * 200], 16)
    assert e.value.code == 2
    n = len(encode_example(enc, "1+" * 200)[0])
    assert capsys.readouterr().err == (f"error: a prompt of {n} tokens plus 16 new ones does not fit the model's "
                                       f"context of 256 tokens\n")
