"""
Generation benchmark: batched KV-cache decoding against recomputing the whole prefix every token.

Both paths run the same model on the same left-padded prompts for --new_tokens tokens (no EOS, so
every row runs to the end), alternating in one run so a noisy machine slows both alike. Prints
tokens per second and the speedup, checks the two produced the same tokens, and writes
OUT/bench_generate.json.

    python bench_generate.py                  # the cpu preset's model, random weights
    python bench_generate.py --preset gpu
"""
import json
import os
import statistics
import time

import torch

from common import make_out_dir, parse_args, write_text_atomic
from model import GPT, GPTConfig
from tasks import DOMAINS, examples, get_tokenizer


def main():
    def extra(p):
        p.add_argument("--batch", type=int, default=32, rule=">= 1", help="prompts decoded at once")
        p.add_argument("--new_tokens", type=int, default=128, rule=">= 1")
        p.add_argument("--repeats", type=int, default=3, rule=">= 1", help="timed runs of each way (the best is kept)")
    args = parse_args(__doc__, ["model"], extra)
    make_out_dir(args.out_dir)
    torch.manual_seed(0)
    enc = get_tokenizer()
    config = GPTConfig(vocab_size=enc.n_vocab, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       block_size=args.block_size)
    model = GPT(config).to(args.device).eval()
    bos = enc.encode_single_token("<|bos|>")
    prompts = [[bos] + enc.encode_ordinary(e["prompt"]) for d in DOMAINS
               for e in examples(d, "test", args.batch // len(DOMAINS) + 1)][:args.batch]
    print(f"torch {torch.__version__} | {args.device} | {torch.get_num_threads()} threads | batch {len(prompts)} "
          f"| {args.new_tokens} new tokens | model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")

    def run(use_cache):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompts, args.new_tokens, eos_id=-1, pad_id=0, use_cache=use_cache)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    run(True)  # warm up
    times, outputs = {"cached": [], "uncached": []}, {}
    for _ in range(args.repeats):
        for name, use_cache in (("cached", True), ("uncached", False)):
            dt, outputs[name] = run(use_cache)
            times[name].append(dt)
    same = outputs["cached"] == outputs["uncached"]
    n_tok = len(prompts) * args.new_tokens
    res = {name: {"seconds": statistics.median(t), "tokens_per_s": n_tok / statistics.median(t)}
           for name, t in times.items()}
    res["speedup"] = res["uncached"]["seconds"] / res["cached"]["seconds"]
    res["same_tokens"] = same
    res.update(device=args.device, threads=torch.get_num_threads(), batch=len(prompts), new_tokens=args.new_tokens,
               torch=torch.__version__)
    print(f"{'':10s} {'seconds':>8s} {'tokens/s':>10s}")
    for name in ("cached", "uncached"):
        print(f"{name:10s} {res[name]['seconds']:8.2f} {res[name]['tokens_per_s']:10.0f}")
    print(f"speedup of the KV cache: {res['speedup']:.1f}x (target >= 10x: {'PASS' if res['speedup'] >= 10 else 'MISS'})"
          f" | same tokens: {same}")
    path = os.path.join(args.out_dir, "bench_generate.json")
    write_text_atomic(json.dumps(res, indent=1), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
