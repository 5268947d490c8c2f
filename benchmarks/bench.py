"""opensd against diffusers, same weights, same process, interleaved: the speed issue's harness.

Every timed case builds one set of weights, gives them to both implementations (opensd's
modules and diffusers'/transformers' reference classes, renamed through opensd's key
maps), checks that both compute the same thing (``max|diff|``), then times them in
turn A, B, A, B, ... after a warm-up. Reported: the median of each side and the ratio
``opensd / diffusers`` of the medians (time: lower is better; the issue's target is
<= 0.7 for inference and <= 1/1.3 for training, i.e. >= 1.3x samples/s).

Cases (``--cases``, comma separated; default: all):

- ``default_txt2img``  the default model (``opensd.defaults.default_model_path()``, else a
  random model of the ``small`` presets), txt2img, 20 DPM++ 2M steps, CFG 7.5, batch 1 and 8,
  ``opensd.load`` against ``diffusers.StableDiffusionPipeline.from_pretrained`` on one folder.
- ``few_step_txt2img``  the whole 4-step LCM generation of the default model with its LCM-LoRA
  (``--few-step``) against diffusers' 20-step DPM++ 2M one (CFG 5) on the same weights, batch 1
  and 8 (``cases_few_step.py``; the issue's target: <= 0.15).
- ``sd15_unet``  one guided U-Net step of the SD 1.5 architecture at 512x512: latents
  (2, 4, 64, 64), context (2, 77, 768); also its FLOPs (FlopCounterMode) and the
  achieved share of this machine's matmul peak.
- ``sd15_vae``   one VAE decode of a (1, 4, 64, 64) latent to 512x512.
- ``sd15_text``  one CLIP ViT-L/14 text-encoder pass over (2, 77) token ids.
- ``sd21_unet``  one guided U-Net step of the SD 2.1 768-v architecture (``UNetConfig.sd21()``),
  latents (2, 4, 64, 64) at 512² on CPU (768² on CUDA), context (2, 77, 1024).
- ``sdxl_unet``  one guided step of the SDXL base U-Net (``UNetConfig.sdxl_base()``) with ``y``,
  at 512² on CPU and 1024² on CUDA; diffusers' weights come through diffusers' own
  single-file converter (``families.py``). ``--unet-size`` sets the side of both.
- ``train_unet`` one AdamW step of the small U-Net: eps-MSE on 8x8x4 latents, batch 64.
- ``train_vae``  one AdamW step of the small VAE: L1 + MSE reconstruction, 32 px, batch 32.
- ``memory``     peak RSS of a whole SD 1.5-architecture generation at 512x512, each
  library in its own subprocess (``ru_maxrss`` of the child, from ``os.wait4``).

Usage (from the repository root)::

    PYTHONPATH=src python3 benchmarks/bench.py --quick --json out/bench.json
    PYTHONPATH=src python3 benchmarks/bench.py --device cuda --dtype fp16 --quick \
        --cases sd15_unet,sd15_vae,sd15_text,default_txt2img
    PYTHONPATH=src python3 benchmarks/bench.py --device cuda --dtype fp16 --cases sd15_unet --compile
    PYTHONPATH=src python3 benchmarks/bench.py --dtype bf16 --quick --threads 1 --cases sd21_unet,sdxl_unet
    bash benchmarks/gpu_families.sh          # SDXL 1024² and SD 2.1 768² on a CUDA GPU, fp16 then bf16

diffusers and transformers are imported only by the cases that need them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from cases_few_step import case_few_step_txt2img
from cases_sd15 import case_sd15_text, case_sd15_unet, case_sd15_vae
from cases_train import case_train_unet, case_train_vae
from families import FAMILY_CASES, FAMILY_FUNCS, family_notes
from harness import Row, Settings, interleave, machine, silence_reference_logs, versions

CASES = ("default_txt2img", "few_step_txt2img", "sd15_unet", "sd15_vae", "sd15_text", *FAMILY_CASES, "train_unet", "train_vae", "memory")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# --dtype auto: opensd in its default precision (opensd.precision, decided for each model) against
# diffusers' default, fp32; only these cases take it
AUTO_CASES = ("default_txt2img", "few_step_txt2img", "sd15_unet", "sd15_vae", "sd15_text")
PROMPT = "a red circle above a blue square"
NEGATIVE = "a green triangle"
# Captions the fallback model's word tokenizer learns its vocabulary from.
CAPTIONS = [
    PROMPT,
    NEGATIVE,
    "a small blue square above a green triangle",
    "three yellow circles on a black background",
    "a picture of a purple square to the left of an orange circle",
]


# ----------------------------------------------------------------------------- case: default model, txt2img


def default_model(s: Settings):
    """(StableDiffusion, tokenizer, description): the default model, else a small random one."""
    from opensd.defaults import default_model_path

    path = default_model_path()
    if path is not None and path.exists():
        from opensd.checkpoints import load_model

        loaded = load_model(path)
        return loaded.model, loaded.tokenizer, f"default model {path}"
    from opensd.models.clip import CLIPTextConfig
    from opensd.models.stable_diffusion import SDConfig, StableDiffusion
    from opensd.models.unet import UNetConfig
    from opensd.models.vae import VAEConfig
    from opensd.tokenizers.word import WordTokenizer

    tok = WordTokenizer.train(CAPTIONS, vocab_size=64, context_length=CLIPTextConfig.small().max_length)
    text = dataclasses.replace(CLIPTextConfig.small(), vocab_size=tok.vocab_size)
    cfg = SDConfig(unet=UNetConfig.small(), vae=VAEConfig.small(), text=text, image_size=32)
    torch.manual_seed(0)
    why = "no default model found" if path is None else f"default model {path} missing"
    return StableDiffusion(cfg).eval(), tok, f"random weights, small presets ({why})"


def case_default_txt2img(s: Settings) -> list[Row]:
    silence_reference_logs()
    import diffusers
    import numpy as np

    import opensd
    from opensd.checkpoints.diffusers_folder import save_diffusers

    model, tok, source = default_model(s)
    print(f"# default_txt2img: {source}", flush=True)
    with tempfile.TemporaryDirectory(prefix="opensd-bench-") as tmp:
        folder = save_diffusers(model, tok, Path(tmp) / "model")
        rs = s.reference()
        # --dtype auto: opensd's own decision for this model (not the SD 1.5 one in s.dtype)
        ours = opensd.load(folder, device=s.device, precision="auto" if s.auto_reason is not None else s.dtype)
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=rs.dtype)
    ref = ref.to(s.device)
    if s.auto_reason is not None:
        print(f"# default_txt2img: opensd {ours.precision.reason}", flush=True)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        ref.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    if s.compile:
        ours.model.model.diffusion_model = torch.compile(ours.model.model.diffusion_model, mode=s.compile_mode)
        ref.unet = torch.compile(ref.unet, mode=s.compile_mode)
    size = model.cfg.image_size
    f = model.cfg.vae.downsample_factor
    rows = []
    for batch in (1, 8):
        lat = torch.randn(batch, model.cfg.vae.embed_dim, size // f, size // f, generator=torch.Generator().manual_seed(batch))

        def run_ours(lat=lat, batch=batch):
            return ours.txt2img(PROMPT, NEGATIVE, steps=20, sampler="dpmpp_2m", cfg_scale=7.5, width=size,
                                height=size, batch_size=batch, latents=lat, seed=1)

        def run_ref(lat=lat, batch=batch):
            return ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=20, guidance_scale=7.5, height=size,
                       width=size, num_images_per_prompt=batch, latents=lat.to(s.device, rs.dtype),
                       output_type="pil").images

        what = f"txt2img {size}², 20 steps dpmpp_2m, batch {batch}"
        if s.auto_reason is not None:
            what += f", opensd default ({ours.precision.name}) vs diffusers default ({rs.dtype_name})"
        row = Row("default_txt2img", what, "img/s", float(batch))
        a, b = interleave(row, run_ours, run_ref, s, False)
        diff = max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max() for x, y in zip(a, b, strict=False)) / 255
        row.max_abs_diff = float(diff)  # on the [0, 1] pixel scale
        row.extra = {"model": source, "opensd_precision": ours.precision.name, "opensd_precision_reason": ours.precision.reason}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- case: memory


def case_memory(s: Settings) -> dict[str, Any]:
    """Peak RSS of load + generate, one subprocess per library, on one exported folder."""
    from opensd.checkpoints.diffusers_folder import save_diffusers
    from opensd.models.stable_diffusion import SDConfig, StableDiffusion
    from opensd.tokenizers.word import WordTokenizer

    tok = WordTokenizer.train(CAPTIONS, vocab_size=64, context_length=77)
    silence_reference_logs()
    cfg = SDConfig.sd15()
    out: dict[str, Any] = {"size": s.memory_size, "steps": s.memory_steps, "weights_dtype": s.dtype_name}
    with tempfile.TemporaryDirectory(prefix="opensd-bench-mem-") as tmp:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(s.device):
            model = StableDiffusion(cfg)
        out["fp32_weight_bytes"] = 4 * sum(p.numel() for p in model.parameters())
        save_diffusers(model.to(s.dtype).cpu(), tok, Path(tmp) / "sd15")
        del model
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
        out["export_s"] = time.perf_counter() - t0
        for lib in ("opensd", "diffusers"):
            cmd = [sys.executable, __file__, "--_memory-child", lib, "--_folder", str(Path(tmp) / "sd15"),
                   "--device", s.device.type, "--dtype", s.dtype_name, "--threads", str(s.threads),
                   "--memory-size", str(s.memory_size), "--memory-steps", str(s.memory_steps)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            stdout = proc.stdout.read() if proc.stdout else ""
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise RuntimeError(f"memory child for {lib} failed with exit code {proc.returncode}")
            child = json.loads(stdout.strip().splitlines()[-1])
            # ru_maxrss is in KiB on Linux, bytes on macOS
            scale = 1 if sys.platform == "darwin" else 1024
            out[lib] = {"peak_rss_bytes": usage.ru_maxrss * scale, **child}
    return out


def memory_child(lib: str, folder: str, s: Settings) -> None:
    """Runs in the subprocess: load ``folder`` with ``lib``, generate once, print a JSON line."""
    size, steps = s.memory_size, s.memory_steps
    lat = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    if lib == "opensd":
        import opensd

        pipe = opensd.load(folder, device=s.device, dtype=s.dtype)
        t1 = time.perf_counter()
        pipe.txt2img(PROMPT, NEGATIVE, steps=steps, sampler="dpmpp_2m", width=size, height=size, latents=lat, seed=1)
    else:
        silence_reference_logs()
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=s.dtype)
        pipe = pipe.to(s.device)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
        )
        t1 = time.perf_counter()
        with torch.inference_mode():
            pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, height=size, width=size,
                 latents=lat.to(s.device, s.dtype), output_type="pil")
    s.sync()
    t2 = time.perf_counter()
    result = {"load_s": t1 - t0, "generate_s": t2 - t1}
    if s.device.type == "cuda":
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(s.device)
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- report


def fmt_s(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def table(rows: list[Row], memory: dict[str, Any] | None, compiled: bool) -> str:
    lines = [
        "| case | opensd median | diffusers median | opensd/diffusers (time) | throughput opensd / diffusers "
        "| spread max/min (opensd, diffusers) | max abs diff |",
        "|---|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        a, b = r.median("opensd"), r.median("diffusers")
        tp = f"{r.per_call / a:.3g} / {r.per_call / b:.3g} {r.unit}"
        diff = "" if r.max_abs_diff is None else f"{r.max_abs_diff:.2e}"
        spread = f"{max(r.opensd_s) / min(r.opensd_s):.2f}, {max(r.diffusers_s) / min(r.diffusers_s):.2f}"
        lines.append(f"| {r.what} | {fmt_s(a)} | {fmt_s(b)} | **{a / b:.2f}x** | {tp} | {spread} | {diff} |")
    out = "\n".join(lines)
    for r in rows:
        if r.case == "sd15_unet":
            e = r.extra
            ref_peak = (f", ({e['diffusers_matmul_peak_dtype']}) {e['diffusers_matmul_peak_gflops']:.0f} GFLOP/s"
                        if "diffusers_matmul_peak_gflops" in e else "")
            out += (
                f"\n\nSD1.5 U-Net guided step: {e['unet_flops_per_call'] / 1e9:.0f} GFLOP per call; "
                f"matmul peak ({e['matmul_peak_dtype']}) {e['matmul_peak_gflops']:.0f} GFLOP/s{ref_peak}; "
                f"achieved opensd {e['opensd_achieved_gflops']:.0f} GFLOP/s ({e['opensd_pct_of_peak']:.1f}% of peak), "
                f"diffusers {e['diffusers_achieved_gflops']:.0f} GFLOP/s ({e['diffusers_pct_of_peak']:.1f}%)."
            )
            out += f"\nHeadline: opensd {1 / r.median('opensd'):.2f} it/s, diffusers {1 / r.median('diffusers'):.2f} it/s."
        if r.first_call_s:
            fc = r.first_call_s
            label = "first call (compile included)" if compiled else "first call"
            out += f"\n{r.what}: {label} opensd {fmt_s(fc['opensd'])}, diffusers {fmt_s(fc['diffusers'])}."
    out += family_notes(rows)
    if memory:
        o, d = memory["opensd"], memory["diffusers"]
        gib = 1024**3
        out += (
            f"\n\n| peak RSS, SD1.5 generation {memory['size']}², {memory['steps']} steps | opensd | diffusers | ratio |\n"
            f"|---|---:|---:|---:|\n"
            f"| ru_maxrss of the child | {o['peak_rss_bytes'] / gib:.2f} GiB | {d['peak_rss_bytes'] / gib:.2f} GiB | "
            f"**{o['peak_rss_bytes'] / d['peak_rss_bytes']:.2f}x** |"
        )
        if "cuda_max_allocated_bytes" in o:
            out += (f"\n| torch.cuda.max_memory_allocated | {o['cuda_max_allocated_bytes'] / gib:.2f} GiB | "
                    f"{d['cuda_max_allocated_bytes'] / gib:.2f} GiB | "
                    f"**{o['cuda_max_allocated_bytes'] / d['cuda_max_allocated_bytes']:.2f}x** |")
        out += (f"\n| load / generate time | {o['load_s']:.1f} s / {o['generate_s']:.1f} s | "
                f"{d['load_s']:.1f} s / {d['generate_s']:.1f} s | |")
        if "fp32_weight_bytes" in memory:  # the CPU target: peak <= fp32 weights + 1.5 GB
            w = memory["fp32_weight_bytes"]
            target = w + 1.5e9
            verdict = "met" if o["peak_rss_bytes"] <= target else "not met"
            out += (f"\nTarget: fp32 weights {w / 1e9:.2f} GB + 1.5 GB = {target / 1e9:.2f} GB; "
                    f"opensd's peak {o['peak_rss_bytes'] / 1e9:.2f} GB ({verdict}).")
    return out


# ----------------------------------------------------------------------------- main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=(*DTYPES, "auto"), default="fp32",
                   help=f"both sides' dtype; auto: opensd's default precision against diffusers' fp32 ({', '.join(AUTO_CASES)})")
    p.add_argument("--compile", action="store_true", help="torch.compile both sides; the first call's time includes it")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default, reduce-overhead, max-autotune)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per side (default: per case and device)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of: {', '.join(CASES)}")
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller matmul-peak probe, fewer memory-case steps")
    p.add_argument("--kernels", choices=("auto", "default", "onednn"), default="auto",
                   help="opensd's kernels in the SD 1.5 module cases (default auto: what opensd does for a model that size)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here (rewritten after every case)")
    p.add_argument("--budget", type=float, default=None, help="seconds; cases not started by then are skipped")
    p.add_argument("--memory-size", type=int, default=512, help="image side of the memory case (default 512)")
    p.add_argument("--memory-steps", type=int, default=None, help="sampling steps of the memory case (default 4, --quick 2)")
    p.add_argument("--unet-size", type=int, default=None,
                   help="image side of sd21_unet/sdxl_unet (default: 512 on CPU; 768 and 1024 on CUDA)")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_folder", dest="folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c and c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.unet_size is not None and (args.unet_size < 64 or args.unet_size % 64):
        p.error("--unet-size must be a multiple of 64 (the latent is 1/8 of it, halved three times)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    other = [c for c in args.cases.split(",") if c and c not in AUTO_CASES]
    if args.dtype == "auto" and (other or args.compile):
        p.error(f"--dtype auto takes only the cases {', '.join(AUTO_CASES)} and no --compile; got {', '.join(other) or '--compile'}")
    return args


def settings(args: argparse.Namespace) -> Settings:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, auto = torch.device(args.device), {}
    dtype, name = DTYPES.get(args.dtype), args.dtype
    if args.dtype == "auto":  # the SD 1.5 modules' shapes decide it (default_txt2img decides for its own model)
        from opensd.precision import SD15_PROBE, decide_precision

        decision = decide_precision("auto", device, SD15_PROBE)
        dtype, name = decision.dtype, decision.name
        auto = {"ref_dtype": torch.float32, "auto_reason": decision.reason}
    return Settings(
        device=device,
        dtype=dtype,
        dtype_name=name,
        compile=args.compile,
        compile_mode=args.compile_mode,
        quick=args.quick,
        repeats=args.repeats,
        threads=torch.get_num_threads(),
        memory_size=args.memory_size,
        memory_steps=args.memory_steps or (2 if args.quick else 4),
        unet_size=args.unet_size,
        kernels=args.kernels,
        **auto,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    s = settings(args)
    if args.memory_child:
        memory_child(args.memory_child, args.folder, s)
        return 0
    start = time.perf_counter()
    report: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(s),
        "settings": {"device": args.device, "dtype": args.dtype, "compile": args.compile,
                     "compile_mode": args.compile_mode if args.compile else None, "quick": args.quick,
                     "repeats": args.repeats, "threads": s.threads, "auto": s.auto_reason},
        "rows": [],
        "memory": None,
        "skipped": [],
        "errors": {},
    }
    m = report["machine"]
    print(f"# opensd vs diffusers, {report['date']}")
    flags = " ".join(f for f, have in m["cpu_flags"].items() if have) or "unknown"
    print(f"# {m['cpu']} (flags: {flags}), {m['cores']} cores, {m.get('gpu', 'no GPU')}; torch {m['torch']}, diffusers "
          f"{m['diffusers']}, transformers {m['transformers']}; {s.threads} threads; {args.device} {args.dtype}"
          f"{' compiled' if args.compile else ''}")
    print(f"# {report['command']}", flush=True)
    if s.auto_reason is not None:
        print(f"# --dtype auto, the SD 1.5 modules: opensd {s.auto_reason}; diffusers fp32", flush=True)
    if s.device.type == "cuda":  # context creation and library loading stay out of the first case's numbers
        x = torch.randn(8, 8, 16, 16, device=s.device, dtype=s.dtype)
        torch.nn.functional.conv2d(x, torch.randn(8, 8, 3, 3, device=s.device, dtype=s.dtype)) @ x.new_ones(14, 14)
        s.sync()
    rows: list[Row] = []
    funcs = {"default_txt2img": case_default_txt2img, "few_step_txt2img": case_few_step_txt2img, "sd15_unet": case_sd15_unet, "sd15_vae": case_sd15_vae,
             "sd15_text": case_sd15_text, "train_unet": case_train_unet, "train_vae": case_train_vae, **FAMILY_FUNCS}
    for name in [c for c in CASES if c in args.cases.split(",")]:
        if args.budget is not None and time.perf_counter() - start > args.budget:
            report["skipped"].append(name)
            print(f"# {name}: skipped (past --budget {args.budget:.0f} s)", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            if name == "memory":
                report["memory"] = case_memory(s)
            else:
                new = funcs[name](s)
                rows.extend(new)
                report["rows"].extend(r.to_json() for r in new)
        except Exception as e:  # one failing case must not lose the others' numbers
            report["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"# {name}: FAILED {type(e).__name__}: {e}", flush=True)
        else:
            print(f"# {name}: done in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - start
    report["machine"].update(versions())  # the versions the cases actually imported
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print()
    print(table(rows, report["memory"], s.compile))
    print(f"\ntotal {report['total_s']:.0f} s" + (f"; JSON in {args.json}" if args.json else ""))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
