
import pytest
import torch

from lora import (ATTN_TARGETS, EXPERT_TARGETS, adapters_off, apply_adapter, attach, load_adapter, lora_layers,
                  lora_parameters, merge, save_adapter, unmerge)
from model import GPT, GPTConfig
from common import fingerprint


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()


def base_ckpt(model):
    state = model.state_dict()
    return {"fingerprint": fingerprint(state), "model_config": vars(model.config).copy()}


def randomize(model):
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.B.normal_(std=0.1)


IDX = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))


def test_fresh_adapter_changes_nothing():
    model = tiny()
    ref, _ = model(IDX)
    layers = attach(model, EXPERT_TARGETS, rank=4, alpha=8)
    assert len(layers) == 2 * 3
    out, _ = model(IDX)
    assert torch.equal(out, ref)


def test_merge_equals_unmerged_and_off_is_base():
    model = tiny()
    ref, _ = model(IDX)
    attach(model, EXPERT_TARGETS + ATTN_TARGETS, rank=4, alpha=8)
    randomize(model)
    out, _ = model(IDX)
    assert not torch.allclose(out, ref)
    with adapters_off(model):
        off, _ = model(IDX)
    assert torch.allclose(off, ref, atol=1e-6)
    merge(model)
    merged, _ = model(IDX)
    assert torch.allclose(merged, out, atol=1e-5)
    unmerge(model)
    back, _ = model(IDX)
    assert torch.allclose(back, out, atol=1e-6)


def test_only_adapter_parameters_get_gradients():
    model = tiny()
    attach(model, EXPERT_TARGETS, rank=4, alpha=8)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    randomize(model)
    _, loss = model(IDX, IDX)
    loss.backward()
    lora_ids = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in lora_ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_save_load_round_trip(tmp_path):
    model = tiny()
    ck = base_ckpt(model)
    attach(model, EXPERT_TARGETS, rank=4, alpha=8)
    randomize(model)
    out, _ = model(IDX)
    save_adapter(str(tmp_path / "e.pt"), model, ck, domain="add", method="rl")
    fresh = tiny()
    ad = load_adapter(str(tmp_path / "e.pt"), ck)
    assert ad["meta"]["domain"] == "add" and ad["rank"] == 4 and ad["alpha"] == 8
    apply_adapter(fresh, ad)
    out2, _ = fresh(IDX)
    assert torch.equal(out, out2)


def test_mismatched_base_refused(tmp_path, capsys):
    model = tiny()
    ck = base_ckpt(model)
    attach(model, EXPERT_TARGETS, rank=4, alpha=8)
    save_adapter(str(tmp_path / "e.pt"), model, ck)
    other = base_ckpt(tiny(seed=1))
    with pytest.raises(SystemExit):
        load_adapter(str(tmp_path / "e.pt"), other)
    assert "another base" in capsys.readouterr().err
    bigger = dict(ck, model_config=dict(ck["model_config"], n_embd=32))
    with pytest.raises(SystemExit):
        load_adapter(str(tmp_path / "e.pt"), bigger)
    assert "other shapes" in capsys.readouterr().err
