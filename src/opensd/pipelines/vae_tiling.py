"""Tiled VAE decoding: large images in bounded memory.

The decoder's activations grow with the image (the SD 1.x decoder holds 128-512 channels
at full resolution, and its mid-block attention is quadratic in the latent's area), so a
2048 px image can need more memory than the U-Net pass that made it. ``decode_tiled``
decodes overlapping latent tiles one at a time and blends them with linear ramps, as
A1111's "Tiled VAE" and diffusers' ``enable_vae_tiling`` do. Memory then depends on the
tile size only.

The decoder is not local: GroupNorm normalises with statistics of the whole input, and
the mid-block attention lets every latent cell see every other one. Per tile, both see
only that tile, so the result differs slightly from a full decode (colours shift a
little between tiles, borders lack context); the overlap and the ramps hide the seams.
"""

from __future__ import annotations

import torch

# Defaults of the pipeline (latent cells): 64-cell tiles (512 px for SD 1.x) overlapping
# by 16, used automatically when the latent is larger than 96 cells (768 px) on a side.
DEFAULT_TILE = 64
DEFAULT_OVERLAP = 16
AUTO_TILE_ABOVE = 96


class TilingError(ValueError):
    """Bad arguments to :func:`decode_tiled`; the message names what is allowed."""


def should_tile(h: int, w: int, tiled: bool | None) -> bool:
    """Whether to decode an (h, w) latent in tiles: ``tiled`` if given, else automatic
    (a side larger than :data:`AUTO_TILE_ABOVE` cells)."""
    if tiled is None:
        return max(h, w) > AUTO_TILE_ABOVE
    return bool(tiled)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` cells covering ``length`` cells with stride
    ``tile - overlap``; the last tile is moved back to end at ``length`` (so it may
    overlap its neighbour by more). One tile at 0 when ``length <= tile``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _ramps(starts: list[int], tile: int, length: int, f: int) -> list[torch.Tensor]:
    """1-D blend weights (tile_len * f,) per tile, in pixels.

    Each tile ramps linearly up over its overlap with the previous tile and down over its
    overlap with the next one, sampled at pixel centres: ``(i + 0.5) / ramp``. Where two
    tiles overlap their weights sum to 1 (a cross-fade); weights are never 0, so every
    pixel has a positive total.
    """
    out = []
    for k, s in enumerate(starts):
        n = min(tile, length - s) * f
        i = torch.arange(n, dtype=torch.float32) + 0.5
        w = torch.ones(n)
        if k > 0:
            prev_end = starts[k - 1] + tile
            ramp = (prev_end - s) * f
            if ramp > 0:
                w = torch.minimum(w, i / ramp)
        if k + 1 < len(starts):
            ramp = (s + tile - starts[k + 1]) * f
            if ramp > 0:
                w = torch.minimum(w, (n - i) / ramp)
        out.append(w)
    return out


def decode_tiled(vae, z: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
    """``vae.decode(z)`` computed tile by tile.

    ``vae``: an :class:`~opensd.models.vae.AutoencoderKL` (anything with ``decode`` and
    ``cfg.downsample_factor``/``cfg.embed_dim``). ``z``: (B, C, h, w), the *unscaled* VAE
    latent, as ``vae.decode`` takes it. Returns (B, 3, h*f, w*f), f the downsample factor.

    The latent is cut into tiles of ``tile`` x ``tile`` cells at a stride of
    ``tile - overlap`` (edge tiles are shifted inward to end at the border); each tile is
    decoded alone and the overlapping pixels are blended with separable linear ramps:
    ``out = sum_t(w_t * image_t) / sum_t(w_t)``, so a region every tile decodes to the same
    colour keeps that colour. If the latent fits in one tile this is exactly
    ``vae.decode(z)``. Otherwise it differs slightly from a full decode, because the
    GroupNorm statistics and the mid-block attention become per-tile; the overlap gives
    each seam context on both sides and the ramps fade one tile into the next.
    """
    for name, v in (("tile", tile), ("overlap", overlap)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TilingError(f"decode_tiled: {name} must be an integer, got {v!r}")
    if tile < 1:
        raise TilingError(f"decode_tiled: tile must be >= 1 latent cell, got {tile}")
    if not 0 <= overlap < tile:
        raise TilingError(f"decode_tiled: overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    c = vae.cfg.embed_dim
    if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != c:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise TilingError(f"decode_tiled: z must be a (B, {c}, h, w) latent, got {got}")
    b, _, h, w = z.shape
    if h <= tile and w <= tile:
        return vae.decode(z)

    f = vae.cfg.downsample_factor
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    wy, wx = _ramps(ys, tile, h, f), _ramps(xs, tile, w, f)
    out = total = None
    for y, ry in zip(ys, wy):
        for x, rx in zip(xs, wx):
            image = vae.decode(z[:, :, y : y + tile, x : x + tile])  # (B, 3, th*f, tw*f)
            if out is None:  # accumulate in float32 whatever the VAE's dtype
                out = torch.zeros(b, image.shape[1], h * f, w * f, device=image.device, dtype=torch.float32)
                total = torch.zeros(1, 1, h * f, w * f, device=image.device, dtype=torch.float32)
            weight = (ry[:, None] * rx[None, :]).to(image.device)  # (th*f, tw*f)
            rows = slice(y * f, y * f + image.shape[2])
            cols = slice(x * f, x * f + image.shape[3])
            out[:, :, rows, cols] += weight * image.float()
            total[:, :, rows, cols] += weight
    return (out / total).to(image.dtype)
