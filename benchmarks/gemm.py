"""Which float32 kernels this CPU runs fastest, and what the default model's steps cost in Python.

Three measurements, each printing a markdown table (and JSON with ``--json``):

``shapes``   every float32 linear GEMM of one U-Net call (the default model at 32 px and the
             SD 1.5 architecture at 512 px, batch 2 for guidance, the rows each layer really
             gets, read from a meta-device copy), timed through torch's default path
             (``F.linear``: MKL), oneDNN with the weight as it is (what ``kernels=onednn``
             runs), oneDNN and MKL with prepacked weights (what Inductor's freezing emits),
             and, for reference only, oneDNN with AMX bf16 products (``fp32_precision="bf16"``:
             not float32 numerics); then what ``opensd.kernels``' ``auto`` chooses, and how long
             its measurement takes. For the default model also its convolutions, through
             ``F.conv2d`` and through oneDNN with prepacked weights.
``txt2img``  the default model, 20 steps of DPM++ 2M, CFG 7.5, batch 1, as ``bench.py
             --cases default_txt2img`` runs it: this tree against ``--base REF`` (a git commit,
             run from an archive of it in a second process; calls alternate), kernels ``default`` against
             ``onednn`` (one process, calls alternate), and the U-Net call eager against
             ``torch.jit.trace`` of it (the same kernels without Python: how much of a step is
             Python).
``compile``  the same txt2img with ``compile=True``: the first call's time (compilation) and
             compiled against eager, calls alternating.

Run from the repository root, one thread (the default model's setting):

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/gemm.py shapes
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/gemm.py txt2img --base main
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/gemm.py compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import cpu_flags, cpu_model  # noqa: E402

PROMPT, NEGATIVE = "a red circle above a blue square", "blurry"


def header() -> dict[str, Any]:
    flags = [k for k, v in cpu_flags().items() if v]
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(), "flags": flags,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "load_average": os.getloadavg()}
    print(f"# {info['date']}: {info['cpu']} (flags: {' '.join(flags)}), {info['threads']} thread(s), torch {info['torch']}, "
          f"load average {' '.join(f'{v:.1f}' for v in info['load_average'])}", flush=True)
    return info


def best_of(fn: Callable[[], Any], repeats: int, min_s: float = 2e-3) -> float:
    """Seconds per call: the fastest of ``repeats`` samples, each at least ``min_s`` of calls."""
    fn()
    t0 = time.perf_counter()
    fn()
    inner = max(1, int(min_s / max(time.perf_counter() - t0, 1e-7)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


# ----------------------------------------------------------------------------- shapes


def meta_unet(cfg) -> nn.Module:
    """A U-Net of ``cfg`` on the meta device: shapes without weights."""
    from opensd.models.unet import UNetModel

    with torch.device("meta"):
        return UNetModel(cfg)


def unet_linear_calls(twin: nn.Module, latent: int, context: int) -> Counter:
    """(rows, in, out, bias) of every nn.Linear call of one guided call of a meta-device U-Net."""
    seen: Counter = Counter()

    def hook(m, args):
        seen[(args[0].numel() // m.in_features, m.in_features, m.out_features, m.bias is not None)] += 1

    hooks = [m.register_forward_pre_hook(hook) for m in twin.modules() if isinstance(m, nn.Linear)]
    cfg = twin.cfg
    with torch.no_grad():
        twin(torch.empty(2, cfg.in_channels, latent, latent, device="meta"), torch.empty(2, device="meta"),
             torch.empty(2, context, cfg.context_dim, device="meta"))
    for h in hooks:
        h.remove()
    return seen


def unet_conv_calls(twin: nn.Module, latent: int, context: int) -> Counter:
    """(input shape, weight shape, stride, padding) of every Conv2d call of one guided call of a meta-device U-Net."""
    seen: Counter = Counter()

    def hook(m, args):
        seen[(tuple(args[0].shape), tuple(m.weight.shape), m.stride, m.padding)] += 1

    hooks = [m.register_forward_pre_hook(hook) for m in twin.modules() if isinstance(m, nn.Conv2d)]
    cfg = twin.cfg
    with torch.no_grad():
        twin(torch.empty(2, cfg.in_channels, latent, latent, device="meta"), torch.empty(2, device="meta"),
             torch.empty(2, context, cfg.context_dim, device="meta"))
    for h in hooks:
        h.remove()
    return seen


def conv_table(twin: nn.Module, latent: int, context: int, repeats: int) -> dict[str, Any]:
    """The U-Net's convolutions through ``F.conv2d`` and through oneDNN with prepacked weights
    (``mkldnn_reorder_conv2d_weight``, what Inductor's freezing does): the weight reorder that
    ``F.conv2d`` repeats on every call is what a small feature map pays most for."""
    g = torch.Generator().manual_seed(0)
    rows, total = [], {"default": 0.0, "packed": 0.0}
    worst = 0.0
    for (xs, ws, stride, pad), count in sorted(unet_conv_calls(twin, latent, context).items()):
        x = torch.randn(xs, generator=g)
        w = torch.randn(ws, generator=g) * (ws[1] * ws[2] * ws[3]) ** -0.5
        b = torch.randn(ws[0], generator=g)
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), list(pad), list(stride), [1, 1], 1, list(xs))
        plain = lambda x=x, w=w, b=b, stride=stride, pad=pad: F.conv2d(x, w, b, stride, pad)  # noqa: E731
        pre = lambda x=x, packed=packed, b=b, pad=pad, stride=stride: torch.ops.mkldnn._convolution_pointwise(x, packed, b, list(pad), list(stride), [1, 1], 1, "none", [], "")  # noqa: E731
        ref = plain()
        worst = max(worst, float((pre() - ref).abs().max() / ref.abs().max()))
        t = {"default": best_of(plain, repeats), "packed": best_of(pre, repeats)}
        for k in total:
            total[k] += t[k] * count
        rows.append({"input": xs, "weight": ws, "count": count, **{f"{k}_s": v for k, v in t.items()}})
    print("\n| convolution: input, weight | calls | F.conv2d | oneDNN, prepacked weight |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {'x'.join(map(str, r['input']))}, {'x'.join(map(str, r['weight']))} | {r['count']} | "
              f"{r['default_s'] * 1e6:.0f} us | {r['packed_s'] / r['default_s']:.2f}x |")
    print(f"| **all, weighted by calls** | {sum(r['count'] for r in rows)} | {total['default'] * 1e3:.2f} ms | "
          f"**{total['packed'] / total['default']:.2f}x** |")
    print(f"max relative difference from F.conv2d: {worst:.1e}")
    return {"rows": rows, "totals_s": total, "max_rel_diff": worst}


def shape_row(rows: int, k: int, n: int, bias: bool, repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g) if bias else None
    dnn_w = torch.ops.mkldnn._reorder_linear_weight(w, rows)
    mkl_w = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    paths = {
        "default": lambda: F.linear(x, w, b),
        "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
        "onednn_packed": lambda: torch.ops.mkldnn._linear_pointwise(x, dnn_w, b, "none", [], ""),
        "mkl_packed": lambda: torch.ops.mkl._mkl_linear(x, mkl_w, w, b, rows),
        "amx_bf16": lambda: F.linear(x, w, b),
    }
    ref = paths["default"]().double()
    out: dict[str, Any] = {"shape": [rows, k, n, bias], "gflop": 2 * rows * k * n / 1e9}
    for name, fn in paths.items():
        prec = torch.backends.mkldnn.matmul.fp32_precision
        if name == "amx_bf16":
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        try:
            got = fn().double()
            out[f"{name}_s"] = best_of(fn, repeats)
            out[f"{name}_rel_diff"] = float((got - ref).abs().max() / ref.abs().max())
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = prec
    return out


def case_shapes(args) -> dict[str, Any]:
    from opensd.checkpoints.opensd_format import read_config
    from opensd.kernels import ONEDNN_MARGIN, linear_shapes, measure
    from opensd.models.unet import UNetConfig

    torch.backends.mkldnn.matmul.fp32_precision = "none"
    cfg = read_config(ROOT / "models" / "opensd-shapes")
    models = {
        "default model, 32 px": (cfg.unet, cfg.image_size // cfg.vae.downsample_factor, cfg.text.max_length),
        "SD 1.5 U-Net, 512 px": (UNetConfig.sd15(), 64, 77),
    }
    result: dict[str, Any] = {}
    names = ("default", "onednn", "onednn_packed", "mkl_packed", "amx_bf16")
    for title, (ucfg, latent, context) in models.items():
        twin = meta_unet(ucfg)
        calls = unet_linear_calls(twin, latent, context)
        rows = [dict(shape_row(r, k, n, b, args.repeats), count=c) for (r, k, n, b), c in sorted(calls.items())]
        total = {nm: sum(r[f"{nm}_s"] * r["count"] for r in rows) for nm in names}
        print(f"\n## {title}: {sum(calls.values())} linear calls per guided U-Net call, {len(calls)} shapes\n")
        print("| rows x in -> out | calls | default | oneDNN | oneDNN packed | MKL packed | AMX bf16 (not fp32) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            m, k, n, _ = r["shape"]
            rel = " | ".join(f"{r[f'{nm}_s'] / r['default_s']:.2f}x" for nm in names[1:])
            print(f"| {m} x {k} -> {n} | {r['count']} | {r['default_s'] * 1e6:.0f} us | {rel} |")
        worst = {nm: max(r[f"{nm}_rel_diff"] for r in rows) for nm in names[1:]}
        print(f"| **all, weighted by calls** | {sum(calls.values())} | {total['default'] * 1e3:.2f} ms | "
              + " | ".join(f"**{total[nm] / total['default']:.2f}x**" for nm in names[1:]) + " |")
        print("max relative difference from the default: " + ", ".join(f"{nm} {worst[nm]:.1e}" for nm in names[1:]))
        t0 = time.perf_counter()
        timing = measure(linear_shapes(twin, 2 * latent * latent))  # what kernels=auto times
        took = time.perf_counter() - t0
        choice = "onednn" if timing.ratio <= ONEDNN_MARGIN else "default"
        print(f"kernels=auto: oneDNN/default {timing.ratio:.2f}x over {len(timing.shapes)} timed shapes, "
              f"measured in {took:.2f} s -> {choice}")
        result[title] = {"rows": rows, "totals_s": total, "max_rel_diff": worst,
                         "auto": {"ratio": timing.ratio, "seconds": took, "choice": choice, "max_rel_diff": timing.max_rel_diff}}
        if title.startswith("default"):
            result[title]["convolutions"] = conv_table(twin, latent, context, args.repeats)
    return result


# ----------------------------------------------------------------------------- txt2img


def default_pipeline(**kw):
    import opensd

    return opensd.load(ROOT / "models" / "opensd-shapes", **kw)


def txt2img_call(pipe) -> Callable[[], Any]:
    f = pipe.cfg.vae.downsample_factor
    size = pipe.cfg.image_size
    lat = torch.randn(1, pipe.cfg.vae.embed_dim, size // f, size // f, generator=torch.Generator().manual_seed(1))
    return lambda: pipe.txt2img(PROMPT, NEGATIVE, steps=20, sampler="dpmpp_2m", cfg_scale=7.5, width=size, height=size,
                                batch_size=1, latents=lat, seed=1)


def alternate(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Each function once per round, in turn; seconds per call."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def summary(times: dict[str, list[float]], base: str) -> dict[str, Any]:
    """Medians, and the median of the per-round ratios to ``base`` (robust to the load moving between rounds)."""
    out = {}
    for k, v in times.items():
        ratios = [a / b for a, b in zip(v, times[base], strict=False)]
        out[k] = {"median_s": statistics.median(v), "min_s": min(v), "ratio_to_" + base: statistics.median(ratios), "times_s": v}
        print(f"| {k} | {statistics.median(v) * 1e3:.0f} ms | {min(v) * 1e3:.0f} ms | **{statistics.median(ratios):.3f}x** |")
    return out


def child(args) -> None:
    """A txt2img server on this interpreter's source: one timed call per "run" line on stdin."""
    torch.set_num_threads(1)
    run = txt2img_call(default_pipeline())
    for _ in range(2):
        run()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t0 = time.perf_counter()
        run()
        print(time.perf_counter() - t0, flush=True)


def alternate_trees(trees: dict[str, Path], rounds: int) -> dict[str, list[float]]:
    """One long-lived process per source tree, loaded and warmed up; the parent asks them for a
    call in turn, so that both meet the same load, as calls alternating in one process do."""
    procs = {}
    for name, src in trees.items():
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
        procs[name] = subprocess.Popen([sys.executable, __file__, "_child"], env=env, cwd=ROOT, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        for p in procs.values():
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a benchmark child failed to start")
        times: dict[str, list[float]] = {k: [] for k in procs}
        for _ in range(rounds):
            for name, p in procs.items():
                p.stdin.write("run\n")
                p.stdin.flush()
                times[name].append(float(p.stdout.readline()))
        return times
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()


def base_tree(ref: str, into: Path) -> Path:
    """``src/`` of commit ``ref``, unpacked under ``into``."""
    archive = into / "src.tar"
    with open(archive, "wb") as fh:
        subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "src"], check=True, stdout=fh)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def case_txt2img(args) -> dict[str, Any]:
    from opensd.kernels import Kernels, route

    result: dict[str, Any] = {}
    if args.base:
        with tempfile.TemporaryDirectory(prefix="opensd-gemm-") as tmp:
            trees = {f"base {args.base}": base_tree(args.base, Path(tmp)), "this tree": ROOT / "src"}
            times = alternate_trees(trees, args.repeats)
        print(f"\n## txt2img, default model, 20 steps: this tree against {args.base} (two processes, calls alternating)\n")
        print("| code | median | fastest | time / base |\n|---|---:|---:|---:|")
        result["trees"] = summary(times, f"base {args.base}")

    pipe = default_pipeline()
    run = txt2img_call(pipe)
    for _ in range(2):
        run()

    def with_kernels(backend):
        def call():
            route(pipe.model, backend)
            return run()
        return call

    print("\n## txt2img, default model, 20 steps: linear layers on torch's default path and on oneDNN (calls alternating)\n")
    print("| kernels | median | fastest | time / default |\n|---|---:|---:|---:|")
    times = alternate({"default": with_kernels(Kernels.DEFAULT), "onednn": with_kernels(Kernels.ONEDNN)}, args.repeats)
    result["kernels"] = summary(times, "default")
    route(pipe.model, Kernels.DEFAULT)
    result["kernels"]["auto"] = pipe.kernels.selection().describe()
    result["python_share"] = python_share(pipe, args.repeats)
    return result


def python_share(pipe, repeats: int) -> dict[str, Any]:
    """The U-Net call eager against its ``torch.jit.trace`` (the same ATen kernels, run without Python)."""
    unet = pipe.model.unet
    f = pipe.cfg.vae.downsample_factor
    side = pipe.cfg.image_size // f
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, pipe.cfg.vae.embed_dim, side, side, generator=g)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, pipe.cfg.text.max_length, pipe.cfg.unet.context_dim, generator=g)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(unet, (x, t, ctx), check_trace=False)
        same = torch.equal(traced(x, t, ctx), unet(x, t, ctx))
        calls = {"eager": lambda: unet(x, t, ctx), "traced": lambda: traced(x, t, ctx)}
        times = alternate({k: (lambda fn=fn: [fn() for _ in range(10)]) for k, fn in calls.items()}, repeats)
    print(f"\n## the U-Net call, eager against torch.jit.trace (bit-identical outputs: {same}); times of 10 calls\n")
    print("| U-Net | median | fastest | time / eager |\n|---|---:|---:|---:|")
    out = summary(times, "eager")
    out["bit_identical"] = same
    return out


def case_compile(args) -> dict[str, Any]:
    import numpy as np

    eager = default_pipeline()
    compiled = default_pipeline(compile=True)
    run_e, run_c = txt2img_call(eager), txt2img_call(compiled)
    a = run_e()
    t0 = time.perf_counter()
    b = run_c()
    first = time.perf_counter() - t0
    print(f"# compile: first compiled txt2img {first:.1f} s (compilation included)", flush=True)
    diff = max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a, b, strict=False))
    run_e()
    run_c()
    print("\n## txt2img, default model, 20 steps: compile=True against eager (calls alternating)\n")
    print("| pipeline | median | fastest | time / eager |\n|---|---:|---:|---:|")
    out = summary(alternate({"eager": run_e, "compiled": run_c}, args.repeats), "eager")
    print(f"first compiled call {first:.1f} s; max pixel difference from eager {diff}/255")
    return {"first_call_s": first, "max_pixel_diff": diff, **out}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["shapes", "txt2img", "compile", "_child"])
    p.add_argument("--repeats", type=int, default=10, help="timed calls (rounds) per variant")
    p.add_argument("--base", help="txt2img: a git commit to compare this tree with (run from an archive of it)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.what == "_child":
        child(args)
        return 0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    info = header()
    result = {"shapes": case_shapes, "txt2img": case_txt2img, "compile": case_compile}[args.what](args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "command": " ".join(sys.argv), args.what: result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
