"""Measurements of a trained shapes-world model quoted in the model card and docs.

    python scripts/measure_default_model.py roundtrip  [-m MODEL]   # VAE round trip of the suites' renders
    python scripts/measure_default_model.py taesd      [-m MODEL]   # the same through the tiny decoder (TAESD)
    python scripts/measure_default_model.py attention  [-m MODEL]   # shape-word attention inside its object
    python scripts/measure_default_model.py relations  [-m MODEL]   # where the two objects of relation prompts land
    python scripts/measure_default_model.py levels     [-m MODEL]   # the same per U-Net level, with the word's share
    python scripts/measure_default_model.py generated  [-m MODEL]   # shape-word attention inside the object drawn for it
    python scripts/measure_default_model.py preview    [-m MODEL]   # the live previews (linear, TAESD) against the VAE decode
    python scripts/measure_default_model.py samples    [-m MODEL] [-o PNG]  # the model card's sample grid
    python scripts/measure_default_model.py segmenter  [-m MODEL]   # its segmenter: held-out IoU, and beside the attention

MODEL defaults to the default model (models/opensd-shapes or $OPENSD_MODEL). ``-c CKPT`` puts
the EMA U-Net of a U-Net training checkpoint (``runs/.../checkpoints/step_*.pt``) into MODEL
first: how the model card's numbers for the fine-tuning's intermediate steps were measured.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import opensd
from opensd.defaults import resolve_model
from opensd.explain.attention import AttentionCollector, build_result, mass_in_mask
from opensd.models.capture import AttentionSink, capture_attention, cross_attention_layers, feature_grid, is_cross_attention
from opensd.models.transformer import BasicTransformerBlock
from opensd.pipelines.images import pil_to_tensor, tensor_to_pil, to_tensor
from opensd.shapes.ceiling import autoencoder_ceiling
from opensd.shapes.dataset import ShapesDataset
from opensd.shapes.run import EvalConfig, Suite
from opensd.shapes.scorer import parse, score_images
from opensd.shapes.suites import benchmark_suite, ground_truth_images, holdout_suite
from opensd.shapes.world import World
from opensd.shapes.world import masks as masks_of


def roundtrip(pipe) -> None:
    """Share of ground-truth scenes the scorer still judges correct after the VAE's round trip
    (:func:`opensd.shapes.ceiling.autoencoder_ceiling`; ``opensd eval --autoencoder`` gives the same)."""
    for suite in (Suite.BENCHMARK, Suite.HOLDOUT):
        r = autoencoder_ceiling(pipe, EvalConfig(suite=suite, world=World.CLASSIC), seed=1)  # the card's 600 and 400
        kept = sum(x["correct"] for x in r["items"]) / len(r["items"])
        print(f"{suite.value}: {len(r['items'])} scenes, kept {kept:.4f}", {k: round(v, 3) for k, v in r["accuracy"].items()})


def taesd(pipe) -> None:
    """The round trip of :func:`roundtrip` three ways on the same scenes: the full VAE, the VAE's
    encoder then the tiny decoder (``decoder="tiny"`` on a latent the model made) and, when the
    tiny autoencoder has an encoder, it alone."""
    from opensd.pipelines.decoders import decode_tiny, require_tiny

    vae, tiny = pipe.model.vae, require_tiny(pipe.tiny_vae)
    for name, suite in (("benchmark", benchmark_suite()), ("holdout", holdout_suite())):
        x = torch.stack([pil_to_tensor(im) for im in ground_truth_images(suite, size=pipe.cfg.image_size, seed=1)])
        rows = {"vae": [], "vae encoder -> tiny decoder": [], "tiny encoder -> tiny decoder": []}
        with torch.no_grad():
            for i in range(0, len(x), 64):
                mean = vae.encode(x[i:i + 64]).mode()
                rows["vae"].append(vae.decode(mean).clamp(-1, 1))
                rows["vae encoder -> tiny decoder"].append(decode_tiny(tiny, vae.to_latent(mean)).clamp(-1, 1))
                if tiny.encoder is not None:
                    rows["tiny encoder -> tiny decoder"].append(tiny.decode(tiny.encode(x[i:i + 64])).clamp(-1, 1))
        for what, parts in rows.items():
            if not parts:
                continue
            rec = torch.cat(parts)
            s = score_images([(im, p.spec) for im, p in zip(tensor_to_pil(rec), suite, strict=False)])
            kept = sum(r["correct"] for r in s["items"]) / len(s["items"])
            db = float(10 * torch.log10(4 / (rec - x).pow(2).mean()))
            print(f"{name}: {what}: {len(suite)} scenes, kept {kept:.4f}, PSNR {db:.1f} dB",
                  {k: round(v, 3) for k, v in s["accuracy"].items()})


def attention(pipe, n: int = 10) -> None:
    """Mass of a shape word's cross-attention inside its object's mask (dilated by half a latent cell),
    against the mask's area share: all layers or the full-resolution ones, at several timesteps."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_explain import masks  # the object masks the explain tests use

    model, size = pipe.model, pipe.cfg.image_size
    f = pipe.cfg.vae.downsample_factor
    blocks = [(name, m) for name, m in model.unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    top = {n for n, _ in blocks if n.startswith(("input_blocks.1.", "input_blocks.2."))
           or n.split(".")[:2] in (["output_blocks", str(k)] for k in range(len(model.unet.output_blocks) - 3,
                                                                          len(model.unet.output_blocks)))}
    top_attn2 = {f"{n}.attn2" for n in top}  # their cross-attention layers, by module path
    ds = ShapesDataset(seed=123, image_size=size, kinds={"single": 1.0, "pair": 1.0, "relation": 1.0})
    out: dict[str, list[float]] = {}
    for s in ds.take(n):
        with torch.inference_mode():
            x0 = model.vae.to_latent(model.vae.encode(to_tensor(s.image, size, size)).mean)
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(123))
            ctx = pipe.encode_prompt([s.caption])
            for layers in ("all", "full-resolution"):
                for ts in ([500], [250], [100, 300, 500, 700]):
                    select = is_cross_attention if layers == "all" else top_attn2.__contains__
                    with AttentionCollector(model.unet, tuple(x0.shape[2:]), select=select) as col:
                        for t in ts:
                            a = pipe.schedule.alphas_cumprod[t].item()
                            model.unet(a**0.5 * x0 + (1 - a) ** 0.5 * eps, torch.tensor([float(t)]), ctx)
                    res = build_result(pipe, s.caption, s.image, col)
                    for obj, m in zip(s.scene.objects, masks(s.scene, size), strict=False):
                        if sum(o.shape == obj.shape for o in s.scene.objects) != 1:
                            continue
                        grown = F.max_pool2d(torch.from_numpy(m)[None, None].float(), 2 * (f // 2) + 1, 1, f // 2)[0, 0] > 0
                        out.setdefault(f"{layers} layers, t={ts}", []).append(mass_in_mask(res.word_map(obj.shape), grown))
                        if layers == "all" and ts == [500]:
                            out.setdefault("area share of the mask", []).append(float(grown.float().mean()))
    for k, v in out.items():
        print(f"{k}: {np.mean(v):.3f} (n={len(v)})")


def levels(pipe, n: int = 16) -> None:
    """Per U-Net level (8x8, 4x4, 2x2 for the default model), on the test's 16 ground-truth scenes
    at timestep 500: the shape word's mass inside its object (dilated mask) and the share of all
    attention the word gets (its map's mean). The DAAM sum over layers weighs each level by that share."""
    model, size = pipe.model, pipe.cfg.image_size
    f = pipe.cfg.vae.downsample_factor
    ds = ShapesDataset(seed=123, image_size=size, kinds={"single": 1.0, "pair": 1.0, "relation": 1.0})
    stats: dict[int, list[tuple[float, float]]] = {}
    for s in ds.take(n):
        probs: list[tuple[str, torch.Tensor]] = []
        with torch.inference_mode():
            x0 = model.vae.to_latent(model.vae.encode(to_tensor(s.image, size, size)).mean)
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(123))
            ctx = pipe.encode_prompt([s.caption])
            a = pipe.schedule.alphas_cumprod[500].item()
            sink = AttentionSink(cross_attention_layers(model.unet), lambda layer, p, probs=probs: probs.append((layer, p)))
            with capture_attention(sink):
                model.unet(a**0.5 * x0 + (1 - a) ** 0.5 * eps, torch.tensor([500.0]), ctx)
        for layer, p in probs:
            col = AttentionCollector(model.unet, tuple(x0.shape[2:]))
            col._store(layer, p)
            res = build_result(pipe, s.caption, s.image, col)
            side = feature_grid(p.shape[2], *x0.shape[2:])[0]
            for obj, m in zip(s.scene.objects, masks_of(s.scene, size), strict=False):
                if sum(o.shape == obj.shape for o in s.scene.objects) != 1:
                    continue
                grown = F.max_pool2d(torch.from_numpy(m)[None, None].float(), 2 * (f // 2) + 1, 1, f // 2)[0, 0] > 0
                word = res.word_map(obj.shape)
                stats.setdefault(side, []).append((mass_in_mask(word, grown), float(word.mean())))
    for side, v in sorted(stats.items(), reverse=True):
        arr = np.array(v)
        print(f"{side}x{side} layers: mass inside {arr[:, 0].mean():.3f}, the word's share of attention "
              f"{arr[:, 1].mean():.4f} (n={len(arr)})")


def generated(pipe) -> None:
    """The explain test's measure on generated images: the shape word's mass inside the object drawn for it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_explain import GENERATED_PROMPTS, generated_shape_word_masses, shape_word_masses

    g = generated_shape_word_masses(pipe, GENERATED_PROMPTS)
    t = shape_word_masses(pipe, 16)
    print(f"generated prompts: {np.mean(g):.3f} (n={len(g)}); ground-truth scenes: {np.mean(t):.3f} (n={len(t)})")


def relations(pipe) -> None:
    """For 'A rel B' and 'B rel A', 6 seeds each: which object the scorer finds on top / on the left."""
    pairs = [("red circle", "blue square"), ("green triangle", "yellow circle"), ("purple square", "orange triangle")]
    tally = {"as asked": 0, "the other way": 0, "unclear": 0}
    for a, b in pairs:
        for rel in ("above", "below", "to the left of", "to the right of"):
            for first, second in ((a, b), (b, a)):
                prompt = f"a {first} {rel} a {second}"
                found = []
                for im in pipe.txt2img(prompt, steps=20, cfg_scale=5, seed=1, batch_size=6):
                    objs = parse(im).objects

                    def find(desc, objs=objs):
                        color, shape = desc.split()
                        hits = [o for o in objs if o.color == color and o.shape == shape]
                        return hits[0] if hits else None

                    A, B = find(first), find(second)
                    if A is None or B is None:
                        found.append("?")
                    elif rel in ("above", "below"):
                        found.append("A-top" if A.center[1] < B.center[1] else "B-top")
                    else:
                        found.append("A-left" if A.center[0] < B.center[0] else "B-left")
                asked = {"above": "A-top", "below": "B-top", "to the left of": "A-left", "to the right of": "B-left"}[rel]
                for f in found:
                    tally["unclear" if f == "?" else "as asked" if f == asked else "the other way"] += 1
                print(prompt, found)
    print(f"of {sum(tally.values())} images: " + ", ".join(f"{k} {v}" for k, v in tally.items()))


def preview(pipe) -> None:
    """PSNR (dB) against each image average-pooled to the latent grid: the linear preview
    ("Approx cheap"), the full VAE decode pooled the same way, the tiny decoder's ("TAESD",
    when the model has one) pooled the same way, and a flat image of the mean colour."""
    from opensd.pipelines.decoders import decode_tiny
    from opensd.pipelines.preview import linear_preview_for

    vae, f = pipe.model.vae, pipe.cfg.vae.downsample_factor
    x = torch.stack([pil_to_tensor(s.image) for s in ShapesDataset(seed=9, image_size=pipe.cfg.image_size).take(64)])
    with torch.no_grad():
        z = vae.encode(x).mode()
        pooled = F.avg_pool2d(x, f)
        rows = {"linear preview": linear_preview_for(vae)(z),
                "full decode": F.avg_pool2d(vae.decode(z).clamp(-1, 1), f),
                "mean colour": pooled.mean((2, 3), keepdim=True).expand_as(pooled)}
        if pipe.tiny_vae is not None:
            rows["TAESD preview"] = F.avg_pool2d(decode_tiny(pipe.tiny_vae, vae.to_latent(z)).clamp(-1, 1), f)
    for name, y in rows.items():
        print(f"{name}: {float(10 * torch.log10(4 / (y - pooled).pow(2).mean())):.1f} dB")


SAMPLE_PROMPTS = [
    "a red circle above a blue square", "a green triangle left of a yellow circle", "three purple squares",
    "a large orange triangle", "a blue circle and a red triangle", "two cyan circles on a black background",
    "a small red square below a green circle", "a yellow square and a purple circle",
]


def samples(pipe, out: str = "samples.png") -> None:
    """Eight prompts (rows), seeds 1-4 (columns), CFG 5, 20 steps of DPM++ 2M, each image enlarged 3x."""
    from PIL import Image

    rows = [pipe.txt2img(p, steps=20, sampler="dpmpp_2m", cfg_scale=5, seed=1, batch_size=4) for p in SAMPLE_PROMPTS]
    side = 3 * pipe.cfg.image_size
    sheet = Image.new("RGB", (4 * side + 3 * 2, len(rows) * side + (len(rows) - 1) * 2), "white")
    for r, images in enumerate(rows):
        for c, im in enumerate(images):
            sheet.paste(im.resize((side, side), Image.Resampling.NEAREST), (c * (side + 2), r * (side + 2)))
    sheet.save(out)
    print(f"wrote {out}: rows are", "; ".join(SAMPLE_PROMPTS))


def segmenter(pipe, folder) -> None:
    """The model folder's segmenter: per-class IoU on 512 and on the tests' 48 held-out scenes, then
    on the explain test's ten generated prompts, each shape word's attention against its region."""
    import sys
    from pathlib import Path

    from opensd.checkpoints.segmenter import FILE_NAME, load_segmenter
    from opensd.explain import attention_maps, compare_with_attention
    from opensd.shapes.segmentation import SegmentationJudge

    seg, classes = load_segmenter(Path(folder) / FILE_NAME)
    for n in (512, 48):
        got = SegmentationJudge(n, pipe.cfg.image_size)(seg.probabilities, classes)
        print(f"held-out scenes (n={n}): " + ", ".join(f"{k} {v:.4f}" for k, v in got.items()))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_explain import GENERATED_PROMPTS

    rows = []
    for i, prompt in enumerate(GENERATED_PROMPTS):
        view = compare_with_attention(attention_maps(pipe, prompt, seed=7 + i, steps=20, cfg_scale=5.0), seg, classes)
        rows += [(a.inside, a.area, a.iou) for a in view.agreements]
    arr = np.array(rows)
    print(f"generated prompts (n={len(arr)} shape words): attention inside the segmenter's region {arr[:, 0].mean():.3f}, "
          f"the region's area {arr[:, 1].mean():.3f}, IoU of the half-max map {arr[:, 2].mean():.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["roundtrip", "taesd", "attention", "levels", "generated", "relations", "preview", "samples",
                                     "segmenter"])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-o", "--out", default="samples.png", help="where `samples` writes its grid")
    ap.add_argument("-c", "--checkpoint", default=None, help="a U-Net training checkpoint whose EMA U-Net to measure")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = opensd.load(resolve_model(args.model))
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        shadow = state["ema"]["unet"]["shadow"]  # the DiffusionLoss module's names: "unet.<U-Net key>"
        pipe.model.unet.load_state_dict({k.removeprefix("unet."): v for k, v in shadow.items()})
    if args.what == "samples":
        samples(pipe, args.out)
        return
    if args.what == "segmenter":
        segmenter(pipe, resolve_model(args.model))
        return
    {"roundtrip": roundtrip, "taesd": taesd, "attention": attention, "levels": levels, "generated": generated, "relations": relations,
     "preview": preview}[args.what](pipe)


if __name__ == "__main__":
    main()
