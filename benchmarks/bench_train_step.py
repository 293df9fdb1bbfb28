"""Benchmark: full fine-tuning steps per second in each precision and memory format, on the CPU.

Model: EfficientNet-Lite0 (offline ImageNet weights) as the Ori network and as DFS-Net, in train
mode, every weight trainable (``mode="full"``). Input: random images, ``--batch-size`` (128) at
``--image-size`` (128) px, random labels over 10 classes - a step costs the same whatever the
pixels are, and this keeps decoding out of the measurement.

Measured: one training step (forward, cross-entropy, backward, AdamW step) in images/s, best of
``--steps`` timed steps after two warm-up steps, for four configurations, repeated
``--repeats`` times in alternation so that load drifts hit all of them alike:

- fp32, NCHW: the named baseline (plain eager torch);
- fp32, channels_last;
- bf16 autocast (Lightning's "bf16-mixed"), channels_last: what ``precision="bf16"`` trains in;
- bf16 autocast, NCHW.

Ratios: each configuration against the fp32 NCHW baseline of the same network and repeat.

Usage: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_train_step.py [--threads 2] [--steps 3]
       [--repeats 2] [--batch-size 128] [--image-size 128]
Writes benchmarks/results/bench_train_step.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_train_step.json"
CONFIGS = (("fp32", False), ("fp32", True), ("bf16", True), ("bf16", False))


def _name(dtype: str, channels_last: bool) -> str:
    return f"{dtype} {'channels_last' if channels_last else 'NCHW'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output (default: %(default)s)")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from dfsnet.models import create_backbone
    from dfsnet.precision import cpu_has_native_bf16
    from dfsnet.train.workflow import build_network

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0", pretrained=True)
    nets = {"ori": build_network(copy.deepcopy(backbone), 10, dfs=False),
            "dfs": build_network(copy.deepcopy(backbone), 10, dfs=True)}
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch_size,))

    def images_per_second(net, dtype: str, channels_last: bool) -> float:
        model = copy.deepcopy(net).train()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        inputs = x.contiguous(memory_format=fmt)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for step in range(2 + args.steps):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                logits = model(inputs)
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= 2:
                times.append(time.perf_counter() - start)
        return args.batch_size / min(times)

    runs: dict[str, dict[str, list[float]]] = {net: {_name(*c): [] for c in CONFIGS} for net in nets}
    for repeat in range(args.repeats):
        for net_name, net in nets.items():
            for config in CONFIGS:
                rate = images_per_second(net, *config)
                runs[net_name][_name(*config)].append(rate)
                print(f"repeat {repeat}: {net_name:3s} {_name(*config):18s} {rate:6.1f} images/s", flush=True)

    summary = {}
    for net_name, by_config in runs.items():
        base = max(by_config[_name("fp32", False)])
        summary[net_name] = {cfg: {"images_per_s_best": max(v), "images_per_s_median": statistics.median(v),
                                   "ratio_vs_fp32_nchw": max(v) / base} for cfg, v in by_config.items()}
        print(f"\n{net_name} (best of {args.repeats}; baseline fp32 NCHW {base:.1f} images/s):")
        for cfg, s in summary[net_name].items():
            print(f"  {cfg:18s} {s['images_per_s_best']:6.1f} images/s  {s['ratio_vs_fp32_nchw']:.2f}x")
    out = {"benchmark": "bench_train_step", "args": {k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(args).items()},
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "native_bf16": cpu_has_native_bf16(), "load_average": list(os.getloadavg()),
                       "torch": torch.__version__},
           "runs": runs, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
