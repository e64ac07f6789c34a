"""
A small GPT: RMSNorm, rotary positions, SDPA attention with separate q/k/v/o projections,
a SwiGLU MLP with gate/up/down, a KV cache and batched generation.

Adapters (lora.py) and the router (router.py) find their targets by these module names:
attention `q`, `k`, `v`, `o` and MLP `gate`, `up`, `down` in every block.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 259
    block_size: int = 192
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_hidden: int = 0  # 0 means round(8/3 * n_embd) to a multiple of 16, as in LLaMA
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.mlp_hidden == 0:
            self.mlp_hidden = 16 * math.ceil(8 * self.n_embd / 3 / 16)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(head_dim, max_len, base):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (T, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, H, T, D); cos/sin: (B, 1, T, D/2) gathered at each row's own positions
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class KVCache:
    """Preallocated keys and values for every layer; `pos` is how many slots are filled."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer, k, v):
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.o = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache, layer):
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if mask is None:  # plain causal training batch: let SDPA pick its fastest kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of residual outputs, as in GPT-2
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets=None, pos=None, mask=None, cache=None):
        """idx (B, T) tokens. targets (B, T) with -1 where no loss is wanted.
        pos (B, T) per-row positions and mask (B, 1, T, S) boolean attention mask are only
        needed for left-padded batches and cached decoding; plain training leaves them None."""
        B, T = idx.shape
        # A row's positions never exceed its slot (cached: cache.pos + its column), so this bound needs no
        # look at pos itself: reading pos.max() would stop a GPU until it caught up, on every call.
        end = (cache.pos if cache is not None else 0) + T
        if end > self.config.block_size:
            raise ValueError(f"sequence of {end} tokens exceeds block_size {self.config.block_size}")
        if pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)
        x = self.wte(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.norm(x)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, eos_id, pad_id, temperature=0.0, top_k=None,
                 generator=None, use_cache=True, n_samples=1):
        """Batched generation for prompts of different lengths (lists of token ids).

        Prompts are left-padded; each row gets its own positions (0 at its first real token) and a
        mask that hides its padding, so a padded row computes exactly what it would alone.
        Returns a list of completions (token ids, without the prompt, up to and including EOS).
        temperature 0 is greedy. n_samples > 1 gives each prompt that many completions (rows
        prompt-major), prefilling each prompt once and copying its cache: a GRPO group shares one
        prefill. Rows that finished are dropped from the batch once they are a quarter of it.
        use_cache=False recomputes the whole prefix every step (the slow reference the cached path
        is tested and benchmarked against)."""
        device = self.wte.weight.device
        B = len(prompts)
        L = max(len(p) for p in prompts)
        if L + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {L} tokens + {max_new_tokens} new tokens exceeds block_size {self.config.block_size}")
        idx = torch.full((B, L), pad_id, dtype=torch.long, device=device)
        real = torch.zeros((B, L), dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            idx[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            real[i, L - len(p):] = True
        S = L + max_new_tokens
        real = torch.cat([real, torch.ones((B, max_new_tokens), dtype=torch.bool, device=device)], 1)
        pos_all = (real.long().cumsum(1) - 1).clamp(min=0)  # (B, S): each row counts from its first real token
        causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
        mask_all = causal[None] & real[:, None, :]  # (B, S, S): query t sees real keys <= t
        mask_all |= torch.eye(S, dtype=torch.bool, device=device)[None]  # pad queries see themselves: no NaN rows

        dtype = self.wte.weight.dtype
        cache = KVCache(self.config, B, S, device, dtype) if use_cache else None
        if n_samples > 1 and not use_cache:  # without a cache there is no prefill to share
            idx, real, pos_all, mask_all = (t.repeat_interleave(n_samples, 0) for t in (idx, real, pos_all, mask_all))
            B, n_samples = B * n_samples, 1
        out = torch.full((B * n_samples, max_new_tokens), pad_id, dtype=torch.long, device=device)
        rows = torch.arange(B * n_samples, device=device)  # the row of `out` each batch row writes to
        done = torch.zeros(B * n_samples, dtype=torch.bool, device=device)
        seq = idx
        for t in range(max_new_tokens):
            if use_cache:
                start = 0 if t == 0 else L + t - 1
                end = L + t
                logits, _ = self(seq[:, start:end], pos=pos_all[:, start:end],
                                 mask=mask_all[:, None, start:end, :end], cache=cache)
                if t == 0 and n_samples > 1:  # prefilled once per prompt; now one row per sample
                    cache.k, cache.v = cache.k.repeat_interleave(n_samples, 1), cache.v.repeat_interleave(n_samples, 1)
                    seq, pos_all, mask_all, logits = (x.repeat_interleave(n_samples, 0)
                                                      for x in (seq, pos_all, mask_all, logits))
            else:
                end = L + t
                logits, _ = self(seq, pos=pos_all[:, :end], mask=mask_all[:, None, :end, :end])
            logits = logits[:, -1, :]
            if temperature == 0.0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[rows, t] = nxt
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == eos_id
            if done.all():
                break
            if use_cache and 4 * done.sum() >= len(done):  # a quarter of the rows finished: stop computing them
                keep = ~done
                rows, seq, pos_all, mask_all, done = rows[keep], seq[keep], pos_all[keep], mask_all[keep], done[keep]
                cache.k, cache.v = cache.k[:, keep], cache.v[:, keep]
        completions = []
        for row in out[:, :t + 1].tolist():
            completions.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
        return completions
