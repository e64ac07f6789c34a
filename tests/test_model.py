import pytest
import torch

from model import GPT, GPTConfig


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=40, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def naive_greedy(model, prompt, n, eos):
    seq = list(prompt)
    out = []
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))
        t = int(logits[0, -1].argmax())
        out.append(t)
        seq.append(t)
        if t == eos:
            break
    return out


def test_cached_batched_generation_matches_naive():
    model = tiny()
    prompts = [[1, 5, 7], [1, 2, 3, 4, 5, 6, 7, 8], [1, 9], [1, 3, 3, 3, 3]]
    eos, pad = 39, 0
    cached = model.generate(prompts, 12, eos, pad)
    uncached = model.generate(prompts, 12, eos, pad, use_cache=False)
    for p, c, u in zip(prompts, cached, uncached):
        ref = naive_greedy(model, p, 12, eos)
        assert c == ref
        assert u == ref


def test_shared_prefill_matches_repeated_prompts():
    model = tiny()
    prompts = [[1, 5, 7], [1, 2, 3, 4, 5, 6]]
    g = lambda: torch.Generator().manual_seed(5)
    repeated = model.generate([p for p in prompts for _ in range(3)], 10, 39, 0, temperature=1.0, generator=g())
    shared = model.generate(prompts, 10, 39, 0, temperature=1.0, generator=g(), n_samples=3)
    uncached = model.generate(prompts, 10, 39, 0, temperature=1.0, generator=g(), n_samples=3, use_cache=False)
    assert shared == repeated == uncached
    assert len(shared) == 6 and len({tuple(c) for c in shared}) > 2  # samples differ within a group


def test_rows_stop_at_eos():
    # finished rows are dropped from the batch as they pile up: the others must not notice
    model = tiny()
    prompts = [[1, 5, 7], [1, 2, 3, 4, 5, 6], [1, 9], [1, 8, 8], [1, 4], [1, 6, 2, 9], [1, 30, 31], [1, 12]]
    full = model.generate(prompts, 12, eos_id=-1, pad_id=0)  # -1 never occurs: no row stops
    eos = full[0][3]
    outs = model.generate(prompts, 12, eos_id=eos, pad_id=0)
    assert sum(eos in f for f in full) >= 2 and not all(eos in f for f in full)  # rows end at different times
    for f, o in zip(full, outs):
        expected = f[:f.index(eos) + 1] if eos in f else f
        assert o == expected
    assert model.generate(prompts, 12, eos_id=eos, pad_id=0, use_cache=False) == outs


def test_sampling_is_seeded():
    model = tiny()
    prompts = [[1, 5], [1, 6, 7]]
    a = model.generate(prompts, 10, 39, 0, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompts, 10, 39, 0, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a == b


def test_loss_ignores_masked_targets():
    model = tiny()
    idx = torch.randint(0, 40, (2, 10))
    tgt = idx.clone()
    tgt[:, :5] = -1
    _, loss = model(idx, tgt)
    logits, _ = model(idx)
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 40), idx[:, 5:].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-6)


def test_too_long_prompt_is_refused():
    model = tiny()
    try:
        model.generate([[1] * 60], 10, 39, 0)
    except ValueError as e:
        assert "block_size" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_forward_refuses_more_tokens_than_the_context():
    from model import KVCache
    model = tiny()  # block_size 64
    model(torch.zeros((1, 64), dtype=torch.long))  # exactly the context: fine
    with pytest.raises(ValueError, match="65 tokens exceeds block_size 64"):
        model(torch.zeros((1, 65), dtype=torch.long))
    cache = KVCache(model.config, 1, 70, "cpu", torch.float32)
    model(torch.zeros((1, 60), dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="65 tokens exceeds block_size 64"):  # 60 cached + 5 new
        model(torch.zeros((1, 5), dtype=torch.long), pos=torch.arange(60, 65)[None], cache=cache)


def test_packed_batch_gives_the_padded_loss_and_gradients():
    from common import completion_batch, encode_example, training_batch
    from tasks import get_tokenizer, sample, sample_mixed, stream_rng
    enc = get_tokenizer()
    rng = stream_rng("pack", "train", 0)
    exs = [sample(d, "train", rng) for d in ["add", "bool", "pick", "ok", "hop"] * 3]
    exs.append(sample_mixed("bool", "add", "train", rng))  # the longest sets the row length
    seqs = [encode_example(enc, e["prompt"], e["completion"]) for e in exs]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=256, n_layer=2, n_head=2, n_embd=32))
    idx, tgt = completion_batch(enc, seqs, "cpu")
    pidx, ptgt, pos, mask, _ = training_batch(enc, seqs, "cpu", pack=True)
    assert pidx.shape[0] < idx.shape[0] and pidx.shape[1] == idx.shape[1]  # fewer rows, same length
    assert sorted(ptgt[ptgt != -1].tolist()) == sorted(tgt[tgt != -1].tolist())  # the same targets
    grads = []
    for kwargs in (dict(idx=idx, targets=tgt), dict(idx=pidx, targets=ptgt, pos=pos, mask=mask)):
        model.zero_grad()
        _, loss = model(**kwargs)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert abs(grads[0][0] - grads[1][0]) < 1e-5
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert training_batch(enc, seqs, "cpu", pack=False)[2:4] == (None, None)
