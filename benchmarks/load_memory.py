"""Peak memory of loading a full-size model: at most the loaded weights + 1.5 GB.

Writes a random full-size model of a family as an original-layout ``.safetensors`` file
in float16 (SDXL base: 6.9 GB on disk) to a temporary folder (``--format opensd``: the
same file as an opensd folder's ``model.safetensors`` beside its config and a small word
tokenizer; ``--format diffusers``: exported with ``save_diffusers``, float16), then loads
it with ``opensd.load(path, dtype=...)`` in a fresh subprocess and reports that process's
peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) against the size of
the loaded model's weights (float32: twice the file; bfloat16 and float16: the file's).
The model is built on the meta device in the dtype asked for and takes the file's
tensors one by one (:func:`opensd.checkpoints.io.read_cast`), so the file's pages and
the loaded weights never coexist in full, and a 16-bit model never exists in float32.

``--src`` runs the child on another source tree (``--src ../main/src``: the same
measurement of another version, for before/after numbers).

The file is written tensor by tensor (the safetensors layout: an 8-byte header length,
a JSON header, the raw bytes), so writing needs little memory; loading SDXL needs about
15 GB (its float32 weights are 13.9 GB). This is a measurement, not a test::

    PYTHONPATH=src python benchmarks/load_memory.py                 # SDXL base
    PYTHONPATH=src python benchmarks/load_memory.py --family sd1    # SD 1.5: 2.1 GB file, ~5 GB RAM
    PYTHONPATH=src python benchmarks/load_memory.py --family sd1 --format opensd --dtype bfloat16

It exits 1 when the peak exceeds the bound.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from opensd.models.stable_diffusion import ModelFamily, SDConfig, StableDiffusion

PRESETS = {ModelFamily.SD1: SDConfig.sd15, ModelFamily.SD2: SDConfig.sd21, ModelFamily.SDXL: SDConfig.sdxl,
           ModelFamily.SDXL_REFINER: SDConfig.sdxl_refiner}
MARGIN_GB = 1.5
DTYPES = ("float32", "bfloat16", "float16")


def write_random_file(cfg: SDConfig, path: Path, seed: int = 0) -> int:
    """A random float16 original-layout file of ``cfg`` at ``path``, one tensor in memory at a time.
    Returns the number of parameters (elements) written."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in StableDiffusion(cfg).state_dict().items()}
    header, offset = {"__metadata__": {"format": "pt", "modelspec.prediction_type": "epsilon"}}, 0
    for k, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[k] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for shape in shapes.values():
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.float16)
            f.write(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # reshape: 0-dim tensors (logit_scale) cannot be viewed as bytes
    return sum(int(torch.Size(s).numel()) for s in shapes.values())


def write_model(cfg: SDConfig, fmt: str, folder: Path) -> Path:
    """A random float16 model of ``cfg`` in ``fmt`` under ``folder``; returns its path."""
    from opensd.checkpoints.io import write_json
    from opensd.checkpoints.opensd_format import CONFIG, FORMAT, VERSION, WEIGHTS
    from opensd.config import to_dict
    from opensd.tokenizers.word import WordTokenizer

    original = folder / "model-fp16.safetensors"
    write_random_file(cfg, original)
    if fmt == "original":
        return original
    if fmt == "opensd":  # an opensd folder's weights have the original layout: the same file
        out = folder / "opensd"
        out.mkdir()
        os.replace(original, out / WEIGHTS)
        tok = WordTokenizer.train(["a red circle above a blue square"], vocab_size=64, context_length=77)
        tok.save(out / "tokenizer")
        write_json({"format": FORMAT, "version": VERSION, "model": to_dict(cfg)}, out / CONFIG)
        return out
    from opensd.checkpoints.diffusers_folder import save_diffusers
    from opensd.checkpoints.original import read_original

    model = read_original(original, config=cfg, dtype=torch.float16).model  # float16: the folder's weights too
    original.unlink()
    tok = WordTokenizer.train(["a red circle above a blue square"], vocab_size=64, context_length=77)
    return save_diffusers(model, tok, folder / "diffusers")


CHILD = """
import resource, sys, time
import torch
t = time.perf_counter()
import opensd
pipe = opensd.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
weights = sum(p.numel() * p.element_size() for p in pipe.model.state_dict().values())
print(weights, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - t)
"""


def measure(path: Path, dtype: str = "float32", src: str | None = None) -> tuple[int, int, float]:
    """(bytes of the loaded weights, peak RSS in bytes, seconds) of loading ``path`` in a new process."""
    env = dict(os.environ, **({"PYTHONPATH": src} if src else {}))
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype], check=True, capture_output=True, text=True, env=env)
    weights, peak, seconds = out.stdout.split()[-3:]
    return int(weights), int(peak), float(seconds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="sdxl", choices=[f.value for f in PRESETS])
    ap.add_argument("--format", default="original", choices=("original", "opensd", "diffusers"))
    ap.add_argument("--dtype", default="float32", choices=DTYPES, help="the dtype the model is loaded in")
    ap.add_argument("--src", default=None, help="the child's PYTHONPATH (another version's src/); default: this one's")
    ap.add_argument("--dir", default=None, help="where to write the temporary file (default: the system's temp dir)")
    args = ap.parse_args()
    cfg = PRESETS[ModelFamily(args.family)]()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t = time.perf_counter()
        path = write_model(cfg, args.format, Path(tmp))
        size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
        print(f"wrote {args.family} as {args.format} ({path.name}): {size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
        weights, peak, seconds = measure(path, args.dtype, args.src)
    bound = weights + MARGIN_GB * 1e9
    print(f"loaded in {args.dtype} in {seconds:.0f} s{' (src ' + args.src + ')' if args.src else ''}: weights "
          f"{weights / 1e9:.2f} GB, peak RSS {peak / 1e9:.2f} GB, bound {bound / 1e9:.2f} GB (weights + {MARGIN_GB} GB): "
          f"{'ok' if peak <= bound else 'OVER'}")
    return 0 if peak <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
