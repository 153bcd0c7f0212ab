"""DDP scaling of zhtune's fast path: run under ``torchrun --nproc_per_node N``; rank 0 prints one JSON line.

Each rank holds the whole model (DDP), takes its own packed rows of every step (the global batch grows with N, as
data parallelism does), and the effective tokens/s of all ranks together is reported. Run it with N=1 and N=2 in the
same job and compare: scaling efficiency = tokens/s(N=2) / (2 x tokens/s(N=1)); ``benchmarks/multi_gpu.py`` does that
for 1, 2, 4, ... N GPUs together with the FSDP2 / ZeRO-3 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="7b")
    parser.add_argument("--lengths", default=".carry/lengths.json")
    parser.add_argument("--row-len", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ckpt", default="1.0", help="share of layers checkpointed (0: none)")
    parser.add_argument("--bucket-mb", type=int, default=25, help="DDP gradient bucket size")
    parser.add_argument("--attn", default="flex_attention", choices=["flex_attention", "sdpa"])
    args = parser.parse_args()

    from benchmarks.train_throughput import SHAPES, _set_checkpointing, build, samples_from
    from zhtune.data.packing import collate_packed, pack_samples, real_tokens
    from zhtune.train.fast import apply_fast_path
    from zhtune.train.loop import disable_lora_input_casting
    from zhtune.train.loss import summed_ce_chunked

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    lengths = json.loads(Path(args.lengths).read_text())["lengths"]
    packed = pack_samples(samples_from(lengths, SHAPES[args.shape]["vocab_size"]), args.row_len, 0)
    model = build(args.shape, "cuda", args.attn)
    fraction = float(args.ckpt)
    _set_checkpointing(model, fraction > 0, fraction)
    disable_lora_input_casting(model)
    applied = apply_fast_path(model).applied
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[torch.cuda.current_device()], bucket_cap_mb=args.bucket_mb, gradient_as_bucket_view=True
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    tokens, start = 0, None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            dist.barrier()
            start, tokens = time.perf_counter(), 0
        first = (step * world + rank) * args.rows
        units = [packed[(first + i) % len(packed)] for i in range(args.rows)]
        batch = collate_packed(units, None if args.attn == "flex_attention" else torch.bool, "cuda")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        n_sup = (batch["labels"][:, 1:] != -100).sum().float()
        dist.all_reduce(n_sup)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = summed_ce_chunked(ddp, inputs, batch["labels"]) * world / n_sup
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += real_tokens(units)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    total = torch.tensor(float(tokens), device="cuda")
    dist.all_reduce(total)
    if rank == 0:
        print(
            json.dumps(
                {
                    "world_size": world,
                    "card": torch.cuda.get_device_name(),
                    "shape": args.shape,
                    "rows_per_rank": args.rows,
                    "row_len": args.row_len,
                    "checkpoint_fraction": fraction,
                    "attention": args.attn,
                    "fast_path": applied,
                    "steps": args.steps,
                    "tokens_per_s": round(total.item() / elapsed, 1),
                }
            ),
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
