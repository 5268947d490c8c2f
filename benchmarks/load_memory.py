"""Peak memory of loading a full-size original single file: at most the weights + 1.5 GB.

Writes a random full-size model of a family as an original-layout ``.safetensors`` file
in float16 (SDXL base: 6.9 GB on disk) to a temporary folder, then loads it with
``opensd.checkpoints.load_model`` in a fresh subprocess and reports that process's peak
resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) against the size of the
loaded model's weights (float32: twice the file). The model is built on the meta device
and takes the file's tensors one by one (:func:`opensd.checkpoints.original.cast_one_by_one`),
so the float16 copy and the float32 weights never coexist in full.

The file is written tensor by tensor (the safetensors layout: an 8-byte header length,
a JSON header, the raw bytes), so writing needs little memory; loading SDXL needs about
15 GB (its float32 weights are 13.9 GB). This is a measurement, not a test::

    PYTHONPATH=src python benchmarks/load_memory.py                 # SDXL base
    PYTHONPATH=src python benchmarks/load_memory.py --family sd1    # SD 1.5: 2.1 GB file, ~5 GB RAM

It exits 1 when the peak exceeds the bound.
"""

from __future__ import annotations

import argparse
import json
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
        for k, shape in shapes.items():
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.float16)
            f.write(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # reshape: 0-dim tensors (logit_scale) cannot be viewed as bytes
    return sum(int(torch.Size(s).numel()) for s in shapes.values())


CHILD = """
import resource, sys, time
t = time.perf_counter()
from opensd.checkpoints import load_model
loaded = load_model(sys.argv[1])
weights = sum(p.numel() * p.element_size() for p in loaded.model.state_dict().values())
print(weights, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - t)
"""


def measure(path: Path) -> tuple[int, int, float]:
    """(bytes of the loaded weights, peak RSS in bytes, seconds) of loading ``path`` in a new process."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, capture_output=True, text=True)
    weights, peak, seconds = out.stdout.split()
    return int(weights), int(peak), float(seconds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="sdxl", choices=[f.value for f in PRESETS])
    ap.add_argument("--dir", default=None, help="where to write the temporary file (default: the system's temp dir)")
    args = ap.parse_args()
    cfg = PRESETS[ModelFamily(args.family)]()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / f"{args.family}-random-fp16.safetensors"
        t = time.perf_counter()
        params = write_random_file(cfg, path)
        print(f"wrote {path.name}: {params:,} params, {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
        weights, peak, seconds = measure(path)
    bound = weights + MARGIN_GB * 1e9
    print(f"loaded in {seconds:.0f} s: weights {weights / 1e9:.2f} GB (float32), peak RSS {peak / 1e9:.2f} GB, "
          f"bound {bound / 1e9:.2f} GB (weights + {MARGIN_GB} GB): {'ok' if peak <= bound else 'OVER'}")
    return 0 if peak <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
