"""Where one guided SD 1.5 U-Net call's time goes, by kind of operator, in opensd and in OpenVINO.

The same call on both engines (batch 2 as classifier-free guidance makes it, 77 context
tokens of width 768, the peers' SD 1.5 weights from ``peer_weights.py``), profiled by each
engine's own tool and sorted into the same kinds: convolution, matmul (linear layers and
the attention projections), attention (the softmax(QK^T)V core), normalization (GroupNorm,
LayerNorm), elementwise (activations, adds, scales), layout (copies, reorders, transposes)
and other. Run under each engine's interpreter, like ``peer_profile.py``:

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/unet_op_profile.py opensd /work/peers/weights/sd15/diffusers --precision bf16
    /work/peers/openvino/bin/python benchmarks/unet_op_profile.py openvino /work/peers/weights/sd15/openvino-ir --precision bf16

The opensd engine takes any opensd-loadable folder (the default model's too: its context is
its own, 32 tokens of width 256; ``--size 32``). opensd: the median wall time of ``--repeats``
calls without the profiler, then ``torch.profiler`` over as many, self CPU time per ATen
operator, on the kernels a generation would use (``--kernels``; auto: measured, :mod:`opensd.kernels`). OpenVINO: the CPU plugin's per-node counters (``PERF_COUNT``) of the compiled,
statically shaped U-Net over the same calls; a node's time is its ``real_time``, its kind
comes from its executed type (a fused node counts under its main operation, so fused
GroupNorm-SiLU or convolution-add chains are counted once). Prints a table and, on the last
line, JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from typing import Any

KINDS = ("convolution", "matmul", "attention", "normalization", "elementwise", "layout", "other")

# (substring of the lower-cased operator name or node type, kind): the first match wins
_TORCH_KINDS = (
    ("convolution", "convolution"), ("conv2d", "convolution"), ("mkldnn_conv", "convolution"),
    ("slow_conv", "convolution"),
    ("scaled_dot_product", "attention"), ("flash_attention", "attention"), ("softmax", "attention"),
    ("baddbmm", "attention"), ("bmm", "attention"),
    ("addmm", "matmul"), ("linear", "matmul"), ("matmul", "matmul"), ("aten::mm", "matmul"),
    ("group_norm", "normalization"), ("layer_norm", "normalization"), ("native_batch_norm", "normalization"),
    ("copy_", "layout"), ("contiguous", "layout"), ("clone", "layout"), ("to_dense", "layout"),
    ("reorder", "layout"), ("permute", "layout"), ("transpose", "layout"), ("reshape", "layout"),
    ("view", "layout"), ("cat", "layout"), ("upsample", "layout"), ("empty", "layout"),
    ("silu", "elementwise"), ("gelu", "elementwise"), ("add", "elementwise"), ("mul", "elementwise"),
    ("div", "elementwise"), ("sub", "elementwise"), ("exp", "elementwise"), ("sin", "elementwise"),
    ("cos", "elementwise"), ("chunk", "elementwise"), ("split", "elementwise"),
)
_OV_KINDS = (
    ("convolution", "convolution"), ("deconvolution", "convolution"),
    ("scaleddotproductattention", "attention"), ("softmax", "attention"),
    ("fullyconnected", "matmul"), ("matmul", "matmul"), ("gemm", "matmul"), ("brgemm", "matmul"),
    ("groupnorm", "normalization"), ("mvn", "normalization"), ("normalize", "normalization"),
    ("reorder", "layout"), ("transpose", "layout"), ("reshape", "layout"), ("concat", "layout"),
    ("interpolate", "layout"), ("gather", "layout"), ("split", "layout"), ("broadcast", "layout"),
    ("eltwise", "elementwise"), ("subgraph", "elementwise"), ("multiply", "elementwise"), ("add", "elementwise"),
)


def kind_of(name: str, table: tuple[tuple[str, str], ...]) -> str:
    low = name.lower()
    return next((kind for key, kind in table if key in low), "other")


def summarize(seconds_by_op: dict[str, float], calls: int, table: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """Per kind: seconds per U-Net call and share; the ten largest operators."""
    by_kind: dict[str, float] = defaultdict(float)
    for op, s in seconds_by_op.items():
        by_kind[kind_of(op, table)] += s
    total = sum(by_kind.values()) or 1.0
    top = sorted(seconds_by_op.items(), key=lambda kv: -kv[1])[:10]
    return {"kinds": {k: {"s_per_call": by_kind[k] / calls, "share": by_kind[k] / total} for k in KINDS},
            "profiled_s_per_call": total / calls,
            "top_ops": [{"op": op, "s_per_call": s / calls, "kind": kind_of(op, table)} for op, s in top]}


def opensd(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import opensd as sd

    torch.set_num_threads(args.threads)
    pipe = sd.load(args.model, precision=args.precision, kernels=args.kernels)
    kernels = pipe.kernels.selection().describe()  # what a generation would run on (measured under auto)
    unet, dtype = pipe.model.model.diffusion_model, pipe.precision.dtype
    g = torch.Generator().manual_seed(0)
    lat = args.size // 8
    x = torch.randn(2, 4, lat, lat, generator=g, dtype=torch.float32).to(dtype)
    t = torch.tensor([500.0, 500.0])
    tokens = pipe.model.cfg.text.max_length  # the model's context: 77 x 768 for SD 1.5
    ctx = torch.randn(2, tokens, unet.cfg.context_dim, generator=g, dtype=torch.float32).to(dtype)
    with torch.inference_mode():
        unet(x, t, ctx)
        wall = []
        for _ in range(args.repeats):  # the wall time without the profiler, which adds per operator
            t0 = time.perf_counter()
            unet(x, t, ctx)
            wall.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeats):
                unet(x, t, ctx)
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    return {"precision": pipe.precision.reason, "kernels": kernels, "wall_s_per_call": sorted(wall)[len(wall) // 2],
            **summarize(ops, args.repeats, _TORCH_KINDS)}


def openvino(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    import numpy as np
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(Path(args.model) / "unet" / "openvino_model.xml"))
    lat = args.size // 8
    model.reshape({"sample": [2, 4, lat, lat], "timestep": [1], "encoder_hidden_states": [2, 77, 768]})
    cfg = {"INFERENCE_NUM_THREADS": str(args.threads), "PERF_COUNT": "YES",
           "INFERENCE_PRECISION_HINT": {"bf16": "bf16", "fp32": "f32"}[args.precision]}
    compiled = core.compile_model(model, "CPU", cfg)
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((2, 4, lat, lat), dtype=np.float32),
            "timestep": np.array([500], dtype=np.int64),
            "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
    req = compiled.create_infer_request()
    req.infer(feed)
    ops: dict[str, float] = defaultdict(float)
    wall = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        req.infer(feed)
        wall.append(time.perf_counter() - t0)
        for node in req.profiling_info:  # this call's counters
            ops[f"{node.node_type}/{node.exec_type}"] += node.real_time.total_seconds()
    return {"precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
            "wall_s_per_call": sorted(wall)[len(wall) // 2], **summarize(ops, args.repeats, _OV_KINDS)}


def table(out: dict[str, Any]) -> str:
    rows = ["| kind | s per call | share |", "|---|---:|---:|"]
    rows += [f"| {k} | {v['s_per_call']:.4f} | {v['share']:.0%} |" for k, v in out["kinds"].items()]
    rows.append(f"| (profiled total) | {out['profiled_s_per_call']:.4f} | |")
    rows.append(f"| (wall, median call) | {out['wall_s_per_call']:.4f} | |")
    rows += ["", "| top operator | s per call | kind |", "|---|---:|---|"]
    rows += [f"| `{o['op']}` | {o['s_per_call']:.4f} | {o['kind']} |" for o in out["top_ops"]]
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine", choices=("opensd", "openvino"))
    p.add_argument("model", help="opensd: the diffusers folder; openvino: the exported IR folder")
    p.add_argument("--size", type=int, default=256, help="image side; the latent is size/8")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kernels", choices=("auto", "default", "onednn"), default="auto", help="opensd's kernels")
    p.add_argument("--repeats", type=int, default=3, help="profiled calls after one warm-up")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    out = {"engine": args.engine, "size": args.size, "threads": args.threads,
           **{"opensd": opensd, "openvino": openvino}[args.engine](args)}
    print(f"## {args.engine}, U-Net of {args.model}, {args.size}², batch 2, {out['precision']}\n\n{table(out)}\n", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(json.dumps(out) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
