"""The routed LoRA kernels: the reference against a dense formula, every fast path against the reference."""
import shutil

import pytest
import torch

import kernels
from kernels import hard_top1, soft_topk

FAST = {"fused": kernels.routed_lora_fused, "sorted": kernels.routed_lora_sorted, "routed_lora": kernels.routed_lora}


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setattr(kernels, "COMPILE", False)  # compiling is tested once, below; eager keeps the rest fast


def problem(N=40, d_in=12, d_out=10, r=3, E=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d_in, generator=g, requires_grad=True)
    logits = torch.randn(N, E, generator=g, requires_grad=True)
    A = torch.randn(E, r, d_in, generator=g, requires_grad=True)
    B = torch.randn(E, d_out, r, generator=g, requires_grad=True)
    scale = torch.rand(E, generator=g) + 0.5
    return x, logits, A, B, scale


def route(logits, mode):
    return hard_top1(logits) if mode == "hard" else soft_topk(logits, 2, normalize=(mode == "soft_norm"))


def run(fn, x, logits, A, B, scale, mode, gy):
    """Output and gradients wrt x, w, the router logits (through w), A and B."""
    idx, w = route(logits, mode)
    y = fn(x, A, B, scale, idx, w)
    return [y] + list(torch.autograd.grad(y, [x, w, logits, A, B], gy))


@pytest.mark.parametrize("mode", ["hard", "soft", "soft_norm"])
def test_reference_matches_dense_formula(mode):
    x, logits, A, B, scale = problem()
    idx, w = route(logits, mode)
    y = kernels.routed_lora_reference(x, A, B, scale, idx, w)
    # every token with its own gathered A and B: (N, k, out, r) (N, k, r, in) (N, in)
    dense = torch.einsum("nkor,nkri,ni,nk->no", B[idx], A[idx], x, w * scale[idx])
    assert torch.allclose(y, dense, atol=1e-5)
    assert y.abs().max() > 0.1


@pytest.mark.parametrize("mode", ["hard", "soft", "soft_norm"])
@pytest.mark.parametrize("name", list(FAST))
@pytest.mark.parametrize("E", [5, 40])  # both sides of routed_lora's pick
def test_fast_equals_reference(name, mode, E):
    x, logits, A, B, scale = problem(N=60, E=E)
    gy = torch.randn(60, 10, generator=torch.Generator().manual_seed(1))
    want = run(kernels.routed_lora_reference, x, logits, A, B, scale, mode, gy)
    got = run(FAST[name], x, logits, A, B, scale, mode, gy)
    for what, a, b in zip(["y", "x", "w", "logits", "A", "B"], want, got):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"{name} {mode}: d{what} differs by {(a - b).abs().max()}"
    assert want[3].abs().max() > 1e-4  # the router gets a gradient in every mode here


def test_pick_uses_both_kernels():
    assert kernels.pick(5, 1) is kernels.routed_lora_fused
    assert kernels.pick(32, 1) is kernels.routed_lora_sorted
    assert kernels.pick(32, 4) is kernels.routed_lora_fused
    assert kernels.pick(32, 1, "cuda") is kernels.routed_lora_fused  # on a GPU fused won up to E = 32


@pytest.mark.parametrize("name", ["reference"] + list(FAST))
@pytest.mark.parametrize("k", [1, 2])
def test_unused_expert_gets_zero_gradient(name, k):
    fn = kernels.routed_lora_reference if name == "reference" else FAST[name]
    x, _, A, B, scale = problem(E=4)
    idx = torch.stack([torch.arange(40) % 3, (torch.arange(40) + 1) % 3], 1)[:, :k]  # expert 3 never chosen
    w = torch.rand(40, k, requires_grad=True)
    y = fn(x, A, B, scale, idx, w)
    gA, gB, gw = torch.autograd.grad(y.square().sum(), [A, B, w])
    assert torch.all(gA[3] == 0) and torch.all(gB[3] == 0)
    assert torch.all(gA[:3].abs().sum(dim=(1, 2)) > 0) and torch.all(gB[:3].abs().sum(dim=(1, 2)) > 0)
    assert torch.all(gw.abs() > 0)


@pytest.mark.parametrize("name", ["reference"] + list(FAST))
def test_hard_ste_unit_weight_and_router_gradient(name):
    fn = kernels.routed_lora_reference if name == "reference" else FAST[name]
    x, logits, A, B, scale = problem()
    p = torch.softmax(logits, -1)
    p.retain_grad()
    p_e, idx = p.max(-1, keepdim=True)
    w = 1 + (p_e - p_e.detach())
    y = fn(x, A, B, scale, idx, w)
    # forward: exactly the chosen expert at unit scale ((1 + p) - p would be off by an ulp for many p)
    unit = kernels.routed_lora_reference(x, A, B, scale, idx, torch.ones_like(w))
    assert torch.equal(w, torch.ones_like(w)) and torch.equal(hard_top1(logits)[1], w)
    assert torch.allclose(y, unit, atol=1e-6)
    gy = torch.randn_like(y)
    y.backward(gy)
    # backward: dL/dp[e*] = <dL/dy, delta_e*>, and it reaches every logit through the softmax
    want = (gy * unit).sum(1)
    assert torch.allclose(p.grad.gather(1, idx).squeeze(1), want, atol=1e-5)
    assert logits.grad is not None and torch.all(logits.grad.abs().sum(1) > 0)


def test_autocast_bf16_runs_and_agrees():
    x, logits, A, B, scale = problem()
    idx, w = hard_top1(logits)
    want = kernels.routed_lora_reference(x, A, B, scale, idx, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fn in [kernels.routed_lora_reference] + list(FAST.values()):
            idx, w = hard_top1(logits)
            y = fn(x.bfloat16(), A, B, scale, idx, w)  # as for the down LoRA: bf16 hidden, fp32 experts
            torch.autograd.grad(y.float().sum(), [x, logits, A, B])
            assert torch.allclose(y.float(), want, atol=0.1, rtol=0.05)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_compiled_fused_equals_reference(monkeypatch):
    monkeypatch.setattr(kernels, "COMPILE", True)
    x, logits, A, B, scale = problem(N=16, d_in=8, d_out=8, r=2, E=3)
    gy = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    want = run(kernels.routed_lora_reference, x, logits, A, B, scale, "hard", gy)
    got = run(kernels.routed_lora_fused, x, logits, A, B, scale, "hard", gy)
    assert kernels.COMPILE and kernels._compiled is not None, "torch.compile failed and fell back to eager"
    for a, b in zip(want, got):
        assert torch.allclose(a, b, atol=1e-5)


def test_compiled_fused_compiles_once_for_any_number_of_tokens(monkeypatch):
    # the token count changes with every batch; compiling first for one count and then again for any
    # would spend two of dynamo's eight recompiles per projection shape and grad mode
    import torch._dynamo.testing
    counter = torch._dynamo.testing.CompileCounter()  # counts graphs, compiles nothing
    torch._dynamo.reset()
    monkeypatch.setattr(kernels, "COMPILE", True)
    monkeypatch.setattr(kernels, "_compiled", torch.compile(kernels._concat_ranks, backend=counter))
    for N in (16, 24, 40):
        x, logits, A, B, scale = problem(N=N)
        gy = torch.randn(N, 10, generator=torch.Generator().manual_seed(1))
        want = run(kernels.routed_lora_reference, x, logits, A, B, scale, "hard", gy)
        got = run(kernels.routed_lora_fused, x, logits, A, B, scale, "hard", gy)
        for a, b in zip(want, got):
            assert torch.allclose(a, b, atol=1e-5)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_compile_failure_falls_back_to_eager_once(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("no working C++ compiler")
    monkeypatch.setattr(kernels, "COMPILE", True)
    monkeypatch.setattr(kernels, "_compiled", broken)
    x, logits, A, B, scale = problem()
    idx, w = hard_top1(logits)
    with pytest.raises(RuntimeError):  # a caller's mistake still raises, and does not switch compile off
        kernels.routed_lora_fused(x, A[:, :, :5], B, scale, idx, w)
    assert kernels.COMPILE
    y = kernels.routed_lora_fused(x, A, B, scale, idx, w)
    y = kernels.routed_lora_fused(x, A, B, scale, idx, w)
    assert not kernels.COMPILE and capsys.readouterr().out.count("torch.compile failed") == 1
    assert torch.allclose(y, kernels.routed_lora_reference(x, A, B, scale, idx, w), atol=1e-5)


def test_fused_compiles_on_cuda_only_unless_told(monkeypatch):
    # NANOMOR_COMPILE unset: on CPU the fused kernel runs eagerly (compiled it is no faster there, and
    # each process would spend seconds compiling it); the compiled function is never built or called
    def never(*args):
        raise AssertionError("compiled on CPU")
    monkeypatch.setattr(kernels, "COMPILE", None)
    monkeypatch.setattr(kernels, "_compiled", never)
    x, logits, A, B, scale = problem()
    idx, w = hard_top1(logits)
    y = kernels.routed_lora_fused(x, A, B, scale, idx, w)
    assert kernels.COMPILE is None
    assert torch.allclose(y, kernels.routed_lora_reference(x, A, B, scale, idx, w), atol=1e-5)
