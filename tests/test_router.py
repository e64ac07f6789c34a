import copy
from dataclasses import asdict

import pytest
import torch

import kernels
from common import fingerprint
from lora import EXPERT_TARGETS, apply_adapter, attach, load_adapter, save_adapter
from model import GPT, GPTConfig
from router import compose, expert_parameters, forced_experts, load_mor, save_mor

E = 3


@pytest.fixture(autouse=True)
def eager_kernel(monkeypatch):
    # these tests are about routing, not the kernel (kernels.py checks its compiled path against its
    # reference); compiling for each new tiny shape would take most of the time here
    monkeypatch.setattr(kernels, "COMPILE", False)


def tiny_base(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=40, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ckpt = {"model_config": asdict(model.config), "fingerprint": fingerprint(model.state_dict())}
    return model, ckpt


def make_expert(path, base, ckpt, seed, rank=4, alpha=8.0):
    """A synthetic expert: random A and B, large enough to change the logits visibly."""
    torch.manual_seed(seed)
    m = copy.deepcopy(base)
    layers = attach(m, EXPERT_TARGETS, rank, alpha)
    with torch.no_grad():
        for layer in layers.values():
            layer.B.normal_(0, 0.2)
    save_adapter(str(path), m, ckpt, domain=f"d{seed}", method="synthetic")
    return str(path)


@pytest.fixture
def setup(tmp_path):
    base, ckpt = tiny_base()
    # different ranks and alphas: zero-padding and each expert's own scale are exercised too
    files = [make_expert(tmp_path / f"e{i}.pt", base, ckpt, seed=i + 1, rank=4 - i, alpha=8.0 + 4 * i)
             for i in range(E)]
    return base, ckpt, files


def tokens(seed=0, B=2, T=10):
    return torch.randint(0, 40, (B, T), generator=torch.Generator().manual_seed(seed))


def test_forced_hard_routing_is_the_expert_alone(setup):
    base, ckpt, files = setup
    idx = tokens()
    for e in range(E):
        alone = copy.deepcopy(base)
        apply_adapter(alone, load_adapter(files[e], ckpt))
        want, _ = alone(idx)
        hard = compose(copy.deepcopy(base), ckpt, files, routing="hard", attn_lora_r=0)
        soft = compose(copy.deepcopy(base), ckpt, files, routing="soft", top_k=1, attn_lora_r=0)
        with forced_experts(hard, [e, e]), forced_experts(soft, [e, e]):
            got_hard, _ = hard(idx)
            got_soft, _ = soft(idx)
        assert torch.allclose(got_hard, want, atol=1e-5), (got_hard - want).abs().max()
        with forced_experts(hard, e):  # one id for every sequence, whatever the batch
            assert torch.equal(hard(idx)[0], got_hard)
        assert not torch.allclose(got_soft, want, atol=1e-3)  # p_e < 1 shrinks the expert's update
        assert not torch.allclose(want, base(idx)[0], atol=1e-3)  # the expert really changes something


def test_forced_per_token_routing_follows_each_token(setup):
    # a (B, T) forced routing: a sequence whose every token names the same expert is that expert's
    # forced sequence; a sequence switching experts midway is causal, so its first tokens are unchanged
    base, ckpt, files = setup
    idx = tokens()
    hard = compose(copy.deepcopy(base), ckpt, files, routing="hard", attn_lora_r=0)
    with forced_experts(hard, [1, 1]):
        want1, _ = hard(idx)
    with forced_experts(hard, [2, 2]):
        want2, _ = hard(idx)
    switch = torch.tensor([[1] * 4 + [2] * 6, [1] * 10])
    with forced_experts(hard, switch):
        got, _ = hard(idx)
    assert torch.allclose(got[1], want1[1], atol=1e-6) and torch.allclose(got[0, :4], want1[0, :4], atol=1e-6)
    assert not torch.allclose(got[0, 4:], want1[0, 4:], atol=1e-3)  # from token 4 on expert 2 writes
    assert not torch.allclose(got[0, 4:], want2[0, 4:], atol=1e-3)  # ... over keys that expert 1 wrote
    with forced_experts(hard, switch[:, :5]), pytest.raises(ValueError, match="forced routing"):
        hard(idx)


def router_grad(model, idx):
    _, loss = model(idx[:, :-1], idx[:, 1:].contiguous())
    loss.backward()
    return model.router.weight.grad


def test_ste_gives_router_gradient_normalized_soft_top1_does_not(setup):
    base, ckpt, files = setup
    idx = tokens(1)
    hard = compose(copy.deepcopy(base), ckpt, files, routing="hard", attn_lora_r=0)
    g = router_grad(hard, idx)
    assert g is not None and g.abs().sum() > 0
    soft = compose(copy.deepcopy(base), ckpt, files, routing="soft", top_k=1, normalize=True, attn_lora_r=0)
    soft.router.weight.data.copy_(hard.router.weight.data)
    with torch.no_grad():  # same routing, same unit scale: the forward passes agree
        assert torch.allclose(soft(idx)[0], hard(idx)[0], atol=1e-6)
    g = router_grad(soft, idx)
    assert g is not None and torch.all(g == 0)


def test_only_router_and_attention_lora_train(setup):
    base, ckpt, files = setup
    model = compose(copy.deepcopy(base), ckpt, files, routing="hard", attn_lora_r=2, attn_alpha=4.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("router.weight") or (".attn." in n and n[-2:] in (".A", ".B")) for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        idx = tokens(step, B=4, T=12)
        _, loss = model(idx[:, :-1], idx[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = dict(model.named_parameters())
    for n, p0 in frozen.items():
        assert params[n].grad is None and torch.equal(params[n], p0), n
    for n, p0 in start.items():
        if n.endswith("router.weight") or n.endswith(".B"):  # attention A only moves once B is non-zero
            assert not torch.equal(params[n], p0), n


def test_train_experts_makes_experts_trainable(setup):
    base, ckpt, files = setup
    model = compose(copy.deepcopy(base), ckpt, files, routing="soft", top_k=2, per_layer=True, train_experts=True)
    assert all(p.requires_grad for p in expert_parameters(model))
    assert model.router.weight.shape == (2, E, 32)


def test_cached_generation_matches_uncached(setup):
    base, ckpt, files = setup
    model = compose(copy.deepcopy(base), ckpt, files, routing="hard", attn_lora_r=2)
    with torch.no_grad():
        model.router.weight.normal_(0, 1.0)  # a confident router that switches experts between tokens
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_(0, 0.1)
    prompts = [[1, 5, 7], [1, 2, 3, 4, 5, 6, 7, 8], [1, 9]]
    cached = model.generate(prompts, 12, eos_id=39, pad_id=0)
    uncached = model.generate(prompts, 12, eos_id=39, pad_id=0, use_cache=False)
    assert cached == uncached
    model.router.record = True
    model(torch.tensor(prompts[1:2]))
    assert len(model.router.records[0]["idx"].unique()) > 1  # routing really varies inside a sequence


def test_save_load_round_trip_and_changed_expert_refused(setup, tmp_path, capsys):
    base, ckpt, files = setup
    model = compose(copy.deepcopy(base), ckpt, files, routing="hard", attn_lora_r=2, attn_alpha=4.0)
    with torch.no_grad():
        model.router.weight.normal_(0, 1.0)
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_(0, 0.1)
    path = str(tmp_path / "mor" / "m.pt")
    save_mor(path, model, ckpt, name="m")
    loaded = load_mor(path, copy.deepcopy(base), ckpt)
    idx = tokens(2)
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])

    make_expert(files[1], base, ckpt, seed=99)  # the same file name now holds another expert
    with pytest.raises(SystemExit):
        load_mor(path, copy.deepcopy(base), ckpt)
    err = capsys.readouterr().err
    assert "expert 1" in err and "fingerprint" in err and "retrain" in err
    other, other_ckpt = tiny_base(seed=1)
    with pytest.raises(SystemExit):
        load_mor(path, other, other_ckpt)
    assert "another base" in capsys.readouterr().err


def test_refusals_are_clear(setup, capsys):
    base, ckpt, files = setup
    with pytest.raises(SystemExit):
        compose(copy.deepcopy(base), ckpt, files, routing="hard", top_k=2)
    assert "top-1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compose(copy.deepcopy(base), ckpt, files, routing="soft", top_k=E + 1)
    assert "--top_k" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Arrow, the random-router and zeroed-expert controls, the routing loss's labels

def test_arrow_sends_a_token_to_the_expert_whose_update_reads_its_direction(tmp_path):
    """Rank-1 experts whose gate and up LoRAs read orthogonal input directions: a token along expert
    e's direction (either sign) goes to e at every layer, at unit weight, and nothing is trainable."""
    base, ckpt = tiny_base()
    dirs = torch.eye(32)[:E]
    files = []
    for e in range(E):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for name, layer in attach(m, EXPERT_TARGETS, 1, 1.0).items():
                if name.endswith("down"):
                    continue
                layer.A.copy_(dirs[e][None])
                layer.B.normal_(0, 1.0)
        save_adapter(str(tmp_path / f"a{e}.pt"), m, ckpt, domain=f"d{e}")
        files.append(str(tmp_path / f"a{e}.pt"))
    model = compose(copy.deepcopy(base), ckpt, files, routing="arrow")
    assert not [p for p in model.parameters() if p.requires_grad]
    proto = model.router.weight  # (L, E, d): unit vectors along each expert's direction, up to sign
    assert torch.allclose(proto.abs(), dirs.expand(2, E, 32), atol=1e-5)
    x = torch.stack([dirs[1], -dirs[2], dirs[0] + 0.1 * dirs[1]])[None]  # (1, 3, d)
    for layer in range(2):
        idx, w = model.router(x, layer)
        assert idx[:, 0].tolist() == [1, 2, 0] and torch.equal(w, torch.ones_like(w))


def test_random_router_ignores_the_router_and_zeroed_experts_are_the_base(setup):
    base, ckpt, files = setup
    model = compose(copy.deepcopy(base), ckpt, files, routing="hard", attn_lora_r=0)
    x = torch.randn(4, 50, 32)
    with forced_experts(model, "random"):
        idx, w = model.router(x, 0)
        again, _ = model.router(x, 0)
    assert sorted(idx.unique().tolist()) == list(range(E)) and not torch.equal(idx, again)  # fresh draws
    assert torch.equal(w, torch.ones_like(w))
    from router import experts_zeroed
    with torch.no_grad(), experts_zeroed(model):
        assert torch.equal(model(tokens())[0], base(tokens())[0])
    assert not torch.equal(model(tokens())[0], base(tokens())[0])  # the scales are back


def test_route_labels_follow_the_token_being_written():
    from common import encode_example, training_batch
    from tasks import DOMAINS, examples, get_tokenizer, join_mixed
    from train_router import route_labels
    enc = get_tokenizer()
    a, b = examples("add", "router", 1)[0], examples("hop", "router", 1)[0]
    batch = [b, join_mixed(a, b), a]
    add, hop = DOMAINS.index("add"), DOMAINS.index("hop")
    for pack in (False, True):
        seqs = [encode_example(enc, r["prompt"], r["completion"]) for r in batch]
        idx, tgt, pos, mask, seq = training_batch(enc, seqs, "cpu", pack)
        labels = route_labels(enc, batch, seq, tgt, DOMAINS)
        for i, (ids, _) in enumerate(seqs):  # every position of a sequence (BOS is never written), nothing else
            assert (labels[seq == i] >= 0).sum() == len(ids) - 1
        assert (labels >= 0).sum() == sum(len(ids) - 1 for ids, _ in seqs)  # padding stays -1
        assert set(labels[seq == 0].tolist()) - {-1} == {hop} and set(labels[seq == 2].tolist()) - {-1} == {add}
        mixed = [x for x in labels[seq == 1].tolist() if x >= 0]
        # the prompt: "add ... |" then " hop ..."; the answer: the add answer and the space before "|",
        # then "| hop answer" and EOS
        n_prompt_a = len(enc.encode_ordinary(a["prompt"].strip() + " |"))
        n_prompt_b = len(enc.encode_ordinary(" " + b["prompt"]))
        n_answer_a = len(enc.encode_ordinary(a["completion"] + " "))
        n_answer_b = len(enc.encode_ordinary("| " + b["completion"])) + 1
        assert mixed == [add] * n_prompt_a + [hop] * n_prompt_b + [add] * n_answer_a + [hop] * n_answer_b


def test_gumbel_routing_is_one_hot_at_unit_scale_and_trains_the_router(setup):
    base, ckpt, files = setup
    idx = tokens(2)
    model = compose(copy.deepcopy(base), ckpt, files, routing="gumbel", attn_lora_r=0).train()
    model.router.record = True
    torch.manual_seed(0)
    g = router_grad(model, idx)
    assert g is not None and g.abs().sum() > 0
    rec = model.router.records[0]
    assert rec["idx"].shape[-1] == 1 and torch.all(rec["w"] == 1.0)  # one expert, exactly unit scale
    # a sample, not the argmax: over many tokens the choices differ from p's argmax somewhere
    assert not torch.equal(rec["idx"][..., 0], rec["p"].argmax(-1))
    model.eval()  # at test: the argmax, as hard routing
    with torch.no_grad():
        hard = compose(copy.deepcopy(base), ckpt, files, routing="hard", attn_lora_r=0)
        hard.router.weight.copy_(model.router.weight)
        assert torch.equal(model(idx)[0], hard(idx)[0])


def test_gumbel_choice_agrees_with_the_argmax_once_tau_is_annealed():
    """A router trained through the straight-through Gumbel sample, tau annealed 1 -> 0.1 as
    train_router.py does, ends choosing what its argmax chooses: the samples match the test-time rule."""
    from router import Router
    torch.manual_seed(0)
    router = Router(8, 3, 1, routing="gumbel").train()
    x = torch.randn(256, 1, 8)
    cost = torch.ones(256, 3)
    wanted = (x[:, 0] @ torch.randn(8, 3)).argmax(-1)  # the expert each token wants: a linear rule
    cost[torch.arange(256), wanted] = -1.0
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    steps = 300
    for step in range(steps):
        router.tau = 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / steps)).item())
        idx, w = router(x, 0)
        loss = (w[:, 0] * cost.gather(1, idx)[:, 0]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert router.tau == pytest.approx(0.1, abs=1e-3)
    with torch.no_grad():
        sampled = router(x, 0)[0][:, 0]
        router.eval()
        argmax = router(x, 0)[0][:, 0]
    assert (sampled == argmax).float().mean() > 0.95
    assert (cost.gather(1, argmax[:, None]) < 0).float().mean() > 0.9  # and it learned the wanted experts


def test_route_weights_single_out_the_answer_tokens_the_base_gets_wrong():
    from train_router import route_weights
    base, _ = tiny_base()
    torch.manual_seed(1)
    idx = torch.randint(40, (3, 12))
    tgt = torch.randint(40, (3, 12))
    tgt[:, :4] = -1  # the prompt: no answer token written there
    base_next = base(idx)[0].argmax(-1)
    tgt[0, 5], tgt[1, 7] = base_next[0, 5], base_next[1, 7]  # answer tokens the base gets right
    w = route_weights(base, idx, tgt, None, None, 30.0)
    decides = (tgt >= 0) & (base_next != tgt)
    assert decides.sum() > 0 and (~decides).sum() > 12
    assert torch.equal(w, torch.where(decides, 31.0, 1.0))
    assert w[0, 5] == 1 and w[1, 7] == 1 and (w[:, :4] == 1).all()
    assert torch.equal(route_weights(base, idx, tgt, None, None, 0.0), torch.ones(3, 12))
