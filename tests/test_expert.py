import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

import train_expert
from common import completion_batch, encode_example, load_base, training_batch
from lora import EXPERT_TARGETS, attach, load_adapter, lora_layers, lora_parameters
from model import GPT, GPTConfig
from tasks import examples, get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENC = get_tokenizer()


def tiny_with_lora():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=ENC.n_vocab, block_size=256, n_layer=2, n_head=2, n_embd=32))
    for p in model.parameters():
        p.requires_grad_(False)
    attach(model, EXPERT_TARGETS, rank=4, alpha=8)
    return model


def rl_args(**kw):
    base = dict(group=4, temperature=1.0, std_norm=False, clip=0.0, ppo_epochs=1, kl=0.0, device="cpu", pack=True,
                micro_batch=0)
    return Namespace(**{**base, **kw})


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    adv = train_expert.group_advantages(r, 4)
    assert torch.allclose(adv[:4], torch.tensor([0.25, -0.75, 0.25, 0.25]))
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group: no signal
    assert torch.allclose(train_expert.group_advantages(r, 4, std_norm=True)[:4].abs().sum() > 0, torch.tensor(True))


def test_one_rl_step_moves_B(monkeypatch):
    model = tiny_with_lora()
    # an untrained model never answers right; reward odd-length completions so groups differ
    monkeypatch.setattr(train_expert, "verify", lambda text, answer: float(len(text) % 2))
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    batch = examples("add", "train", 2)
    stats = train_expert.rl_step(model, ENC, opt, batch, rl_args(), torch.Generator().manual_seed(0))
    assert 0 < stats["reward"] < 1
    assert any(m.B.abs().sum() > 0 for m in lora_layers(model).values())


@pytest.mark.parametrize("pack", [True, False])
def test_micro_batches_give_the_whole_batch_update(monkeypatch, pack):
    """--micro_batch splits the backward pass into chunks of rows; the step must not change."""
    monkeypatch.setattr(train_expert, "verify", lambda text, answer: float(len(text) % 2))
    batch = examples("add", "train", 3)
    updated = []
    for micro_batch in (0, 5):
        model = tiny_with_lora()
        with torch.no_grad():
            for m in lora_layers(model).values():
                m.B.normal_(std=0.1)
        opt = torch.optim.SGD(lora_parameters(model), lr=1.0)
        stats = train_expert.rl_step(model, ENC, opt, batch, rl_args(pack=pack, micro_batch=micro_batch, kl=0.1),
                                     torch.Generator().manual_seed(0))
        updated.append(([p.detach().clone() for p in lora_parameters(model)], stats))
    (before, whole), (after, chunked) = updated
    assert 0 < whole["reward"] < 1 and whole["reward"] == chunked["reward"]  # the same rollouts
    assert abs(whole["loss"] - chunked["loss"]) < 1e-6
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-6)


def test_rollouts_without_advantage_are_left_out_of_the_update(monkeypatch):
    """rl_step skips the rows of groups whose rewards are all equal; the step is the whole batch's."""
    batch = examples("add", "train", 3)
    # the first prompt's group is all right (no advantage), the others' rewards differ
    reward = lambda text, answer: 1.0 if answer == batch[0]["answer"] else float(len(text) % 2)
    monkeypatch.setattr(train_expert, "verify", reward)
    rows = []
    monkeypatch.setattr(train_expert, "training_batch", lambda enc, seqs, *a: rows.append(len(seqs)) or training_batch(enc, seqs, *a))
    params = []
    for skip in (True, False):
        model = tiny_with_lora()
        with torch.no_grad():
            for m in lora_layers(model).values():
                m.B.normal_(std=0.1)
        opt = torch.optim.SGD(lora_parameters(model), lr=1.0)
        if skip:
            train_expert.rl_step(model, ENC, opt, batch, rl_args(), torch.Generator().manual_seed(0))
        else:  # the whole batch, by hand: every rollout, advantages of 0 included
            prompts, comps, rewards = train_expert.rollouts(model, ENC, batch, 4, 1.0, torch.Generator().manual_seed(0))
            adv = train_expert.group_advantages(rewards, 4)
            assert (adv[:4] == 0).all() and (adv[4:] != 0).any()
            idx, tgt, pos, mask, seq = training_batch(ENC, [(p + c, len(p)) for p, c in zip(prompts, comps)], "cpu", True)
            opt.zero_grad()
            train_expert.policy_loss(model, idx, tgt, adv[seq.clamp(min=0)], pos, mask).backward()
            opt.step()
        params.append([p.detach().clone() for p in lora_parameters(model)])
    assert rows[0] == 8  # 12 rollouts, the first group's 4 left out
    for a, b in zip(*params):
        assert torch.allclose(a, b, atol=1e-6)


def test_equal_rewards_give_zero_gradient():
    model = tiny_with_lora()
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.B.normal_(std=0.1)  # non-zero B so A would get gradient too
    seqs = [encode_example(ENC, e["prompt"], e["completion"]) for e in examples("bool", "train", 4)]
    idx, tgt = completion_batch(ENC, seqs, "cpu")
    adv = train_expert.group_advantages(torch.ones(4), 4)
    loss = train_expert.policy_loss(model, idx, tgt, adv)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in lora_parameters(model))


def test_prompt_and_pad_tokens_get_no_gradient():
    model = tiny_with_lora()
    seqs = [encode_example(ENC, e["prompt"], e["completion"]) for e in examples("ok", "train", 3)]
    idx, tgt = completion_batch(ENC, seqs, "cpu")
    assert (tgt != -1).any() and (tgt == -1).any()
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    model.lm_head.register_forward_hook(keep)
    loss = train_expert.policy_loss(model, idx, tgt, torch.tensor([1.0, -0.5, 0.3]))
    loss.backward()
    g = captured["logits"].grad.abs().sum(-1)
    assert torch.all(g[tgt == -1] == 0)
    assert torch.all(g[tgt != -1] > 0)


def test_sft_targets_are_completion_only():
    ex = examples("hop", "train", 1)[0]
    ids, n_prompt = encode_example(ENC, ex["prompt"], ex["completion"])
    idx, tgt = completion_batch(ENC, [(ids, n_prompt)], "cpu")
    assert torch.all(tgt[0, :n_prompt - 1] == -1)
    assert tgt[0, n_prompt - 1:].tolist() == ids[n_prompt:]  # completion and EOS, nothing else
    assert ENC.decode(ids[n_prompt:-1]) == ex["completion"]


def test_stop_reward_needs_the_last_steps_to_average_it():
    curve = lambda *rewards: [{"reward": r} for r in rewards]
    reached = lambda c, stop: train_expert.reward_reached(c, stop, "cpu", 1)
    assert not reached(curve(1, 1, 1, 1), 0.98)  # fewer steps than the window
    assert reached(curve(0, 1, 1, 1, 1, 0.9), 0.98) and not reached(curve(1, 1, 1, 1, 0.85), 0.98)
    assert not reached(curve(1, 1, 1, 1, 1), 0.0)  # 0: never stop early


def test_smoke_expert_end_to_end(tmp_path, monkeypatch):
    out = str(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run([sys.executable, *a, "--preset", "smoke", "--out_dir", out], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=300)
    r = run("pretrain.py")
    assert r.returncode == 0, r.stderr
    for method in ("rl", "sft"):
        r = run("train_expert.py", "--domain", "pick", "--method", method)
        assert r.returncode == 0, r.stderr
        assert "step 3/3" in r.stdout
    _, _, base = load_base(out, "cpu")
    for name in ("pick.pt", "pick_sft.pt"):
        ad = load_adapter(os.path.join(out, "experts", name), base)
        assert ad["meta"]["domain"] == "pick" and "accuracy" in ad["meta"]["metrics"]
        assert len(ad["meta"]["metrics"]["curve"]) == 3
    r = run("train_expert.py", "--domain", "chess")
    assert r.returncode != 0 and "--domain must be one of" in r.stderr and "Traceback" not in r.stderr

    # --stop_reward: every rollout right from the first step, so training stops after the 5-step window
    monkeypatch.setattr(train_expert, "verify", lambda text, answer: 1.0)
    monkeypatch.setattr(sys, "argv", ["train_expert.py", "--preset", "smoke", "--out_dir", out, "--domain", "add",
                                      "--steps", "30", "--eval_every", "0", "--stop_reward", "0.9"])
    train_expert.main()
    metrics = load_adapter(os.path.join(out, "experts", "add.pt"), base)["meta"]["metrics"]
    assert len(metrics["curve"]) == 5 and metrics["evals"][-1][0] == 5  # evaluated where it stopped


def test_packed_rollouts_give_the_padded_policy_loss():
    model = tiny_with_lora()
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.B.normal_(std=0.1)
    seqs = [encode_example(ENC, e["prompt"], e["completion"]) for d in ("add", "hop", "ok") for e in examples(d, "train", 3)]
    adv = torch.linspace(-1, 1, len(seqs))
    losses = []
    for pack in (False, True):
        idx, tgt, pos, mask, seq = training_batch(ENC, seqs, "cpu", pack)
        losses.append(train_expert.policy_loss(model, idx, tgt, adv[seq.clamp(min=0)], pos, mask, kl=0.1).item())
    assert idx.shape[0] < len(seqs)  # packed: fewer rows
    assert abs(losses[0] - losses[1]) < 1e-5


def test_step_0_reads_the_base_accuracy_pretraining_measured_on_the_same_prompts():
    # an expert starts as the base (B = 0): its step-0 accuracy is the base's, which pretraining measured;
    # on another number of prompts it is measured here, and equals what pretraining would have stored
    model = tiny_with_lora().eval()
    measured = train_expert.greedy_accuracy(model, ENC, "add", 4)
    ckpt = {"metrics": {"accuracy": {"add": 0.75}}, "train_config": {"eval_n": 4}}
    assert train_expert.base_accuracy(model, ENC, ckpt, "add", 4) == 0.75
    assert train_expert.base_accuracy(model, ENC, ckpt, "add", 5) == train_expert.greedy_accuracy(model, ENC, "add", 5)
    assert train_expert.base_accuracy(model, ENC, {}, "add", 4) == measured
    for layer in lora_layers(model).values():  # the zero B of a fresh expert: the base's own answers
        assert not layer.B.any()
