"""
Pretraining-step benchmark: where one step of the preset's model goes, the CPU making the batch
or the device training on it.

Makes --batches batches of the preset's pretraining data (timed: sampling and encoding, then
padding and copying to the device, the device's start on the first copy included), then times one
pass over them of the training step alone (forward, backward, gradient clipping, AdamW as
pretrain.py does it), eager and compiled, each with and without reading the loss back every step.
Random weights; the first pass of each variant (compilation, warm-up) is not timed. Prints ms a step
and TFLOP/s (MFU on a known GPU), and writes OUT/bench_pretrain.json.

    python bench_pretrain.py --preset gpu       # on a GPU: the gpu preset's 25.6M model, bf16
    python bench_pretrain.py --compile false    # eager only (compiling takes a while on CPU)
"""
import json
import os
import time

import torch

from common import autocast, die, encode_example, make_out_dir, parse_args, training_batch, write_text_atomic
from model import GPT, GPTConfig
from pretrain import flops_per_token, peak_flops, pretrain_batch
from tasks import get_tokenizer, stream_rng


def main():
    def extra(p):
        p.add_argument("--batches", type=int, default=30, rule=">= 1", help="batches in a timed pass")
    args = parse_args(__doc__, ["model", "pretrain"], extra)
    make_out_dir(args.out_dir)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    enc = get_tokenizer()
    rng = stream_rng("pretrain", "train", args.seed)
    t0 = time.perf_counter()
    raw = [[encode_example(enc, e["prompt"], e["completion"])
            for e in pretrain_batch(rng, args.batch_size, args.bug_rate, args.mixed_frac)] for _ in range(args.batches)]
    t1 = time.perf_counter()
    batches = [training_batch(enc, seqs, args.device, args.pack) for seqs in raw]
    sync()
    t2 = time.perf_counter()
    res = {"sample_encode_ms": 1000 * (t1 - t0) / args.batches, "pad_copy_ms": 1000 * (t2 - t1) / args.batches}
    config = GPTConfig(vocab_size=enc.n_vocab, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       block_size=args.block_size)
    print(f"torch {torch.__version__} | {args.device} | {torch.get_num_threads()} threads | preset {args.preset} "
          f"| batch {args.batch_size} | bf16 {args.bf16 and args.device.startswith('cuda')}")
    print(f"making a batch: sample + encode {res['sample_encode_ms']:.1f} ms, pad + copy {res['pad_copy_ms']:.1f} ms")
    peak = peak_flops(args.device)
    for compiled in ([False, True] if args.compile else [False]):
        torch.manual_seed(args.seed)
        model = GPT(config).to(args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device.startswith("cuda"))
        step_fn = torch.compile(model) if compiled else model
        n_matmul = sum(p.numel() for p in model.parameters()) - model.wte.weight.numel()
        flops = sum(flops_per_token(config, n_matmul, b[0].size(1)) * sum(len(ids) - 1 for ids, _ in seqs)
                    for b, seqs in zip(batches, raw))

        def one_pass(read_loss):
            for idx, tgt, pos, mask, _ in batches:
                with autocast(args):
                    _, loss = step_fn(idx, tgt, pos=pos, mask=mask)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if read_loss:
                    loss.item()
            sync()

        t = time.perf_counter()
        one_pass(True)  # compiles every new length; not timed
        first_s = time.perf_counter() - t
        for read_loss in (False, True):
            t = time.perf_counter()
            one_pass(read_loss)
            ms = 1000 * (time.perf_counter() - t) / args.batches
            rate = flops / args.batches / (ms / 1000)
            name = f"{'compiled' if compiled else 'eager'}{'_read_loss' if read_loss else ''}"
            res[name] = {"ms": ms, "tflops": rate / 1e12, "mfu": rate / peak if peak else None, "first_pass_s": first_s}
            print(f"{'compiled' if compiled else 'eager':8s} | loss read every step {str(read_loss):5s} | {ms:7.1f} ms a step"
                  f" | {rate / 1e12:.3f} TFLOP/s" + (f" | MFU {rate / peak:.1%}" if peak else "")
                  + f" | first pass {first_s:.0f}s")
    res.update(device=args.device, torch=torch.__version__, preset=args.preset, batch_size=args.batch_size,
               batches=args.batches, threads=torch.get_num_threads())
    path = os.path.join(args.out_dir, "bench_pretrain.json")
    write_text_atomic(json.dumps(res, indent=1), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
