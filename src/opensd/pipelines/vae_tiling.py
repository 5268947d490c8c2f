"""Tiled VAE decoding and encoding: large images in bounded memory.

The decoder's activations grow with the image (the SD 1.x decoder holds 128-512 channels
at full resolution, and its mid-block attention is quadratic in the latent's area), so a
2048 px image can need more memory than the U-Net pass that made it. ``decode_tiled``
decodes overlapping latent tiles one at a time and blends them with linear ramps, as
A1111's "Tiled VAE" and diffusers' ``enable_vae_tiling`` do. Memory then depends on the
tile size only. ``encode_tiled`` does the same for the encoder (img2img and inpainting of
large images): the posterior moments of overlapping pixel tiles are blended in latent space.

The decoder is not local: GroupNorm normalises with statistics of the whole input, and
the mid-block attention lets every latent cell see every other one. Per tile, both see
only that tile, so the result differs slightly from a full decode (colours shift a
little between tiles, borders lack context); the overlap and the ramps hide the seams.
The encoder is not local either, for the same reasons.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from opensd.errors import OpenSDError
from opensd.models.vae import DiagonalGaussian, VAEConfig

# Defaults of the pipeline (latent cells): 64-cell tiles (512 px for SD 1.x) overlapping
# by 16, used automatically when the latent is larger than 1.5 times the model's native
# size on a side (SD 1.x: 96 cells = 768 px; SD 2.x 768-v: 144 cells; SDXL: 192 cells =
# 1536 px), and never at 96 cells or fewer (small models keep SD 1.x's rule).
DEFAULT_TILE = 64
DEFAULT_OVERLAP = 16
AUTO_TILE_ABOVE = 96
AUTO_TILE_NATIVE_RATIO = 1.5


class TilingError(OpenSDError):
    """Bad arguments to :func:`decode_tiled` or :func:`encode_tiled`; the message names what is allowed."""


class TileableVAE(Protocol):
    """What the tiling functions use of a VAE (an :class:`~opensd.models.vae.AutoencoderKL`)."""

    @property
    def cfg(self) -> VAEConfig: ...

    def encode(self, x: torch.Tensor) -> DiagonalGaussian: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...


def auto_tile_above(native: int | None = None) -> int:
    """The automatic threshold in latent cells for a model whose native size is ``native``
    cells (None: SD 1.x's 64): the larger of :data:`AUTO_TILE_ABOVE` and 1.5 times ``native``."""
    if native is None:
        return AUTO_TILE_ABOVE
    return max(AUTO_TILE_ABOVE, int(native * AUTO_TILE_NATIVE_RATIO))


def should_tile(h: int, w: int, tiled: bool | None, *, native: int | None = None) -> bool:
    """Whether to run the VAE on an (h, w)-cell latent in tiles: ``tiled`` if given, else automatic
    (a side larger than :func:`auto_tile_above` cells for a model of ``native`` latent cells)."""
    if tiled is None:
        return max(h, w) > auto_tile_above(native)
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


def _check(fn: str, tile: int, overlap: int) -> None:
    for name, v in (("tile", tile), ("overlap", overlap)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TilingError(f"{fn}: {name} must be an integer, got {v!r}")
    if tile < 1:
        raise TilingError(f"{fn}: tile must be >= 1 latent cell, got {tile}")
    if not 0 <= overlap < tile:
        raise TilingError(f"{fn}: overlap must be in [0, tile) = [0, {tile}), got {overlap}")


def _blend_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, h: int, w: int, tile: int, overlap: int, in_scale: int, out_scale: int) -> torch.Tensor:
    """``fn`` applied tile by tile and blended with separable linear ramps.

    Tiles are laid out in latent cells over an (h, w)-cell grid; a tile at cell (y, x)
    reads ``x[..., y*in_scale : (y+tile)*in_scale, ...]`` and its output, ``out_scale``
    units per cell, is blended at ``y*out_scale``: ``out = sum_t(w_t * fn(tile_t)) / sum_t(w_t)``.
    """
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    wy, wx = _ramps(ys, tile, h, out_scale), _ramps(xs, tile, w, out_scale)
    out: torch.Tensor | None = None
    total: torch.Tensor | None = None
    for y, ry in zip(ys, wy, strict=False):
        for x0, rx in zip(xs, wx, strict=False):
            piece = fn(x[:, :, y * in_scale : (y + tile) * in_scale, x0 * in_scale : (x0 + tile) * in_scale])
            if out is None or total is None:  # (None together) accumulate in float32 whatever the VAE's dtype
                out = torch.zeros(x.shape[0], piece.shape[1], h * out_scale, w * out_scale, device=piece.device,
                                  dtype=torch.float32)
                total = torch.zeros(1, 1, h * out_scale, w * out_scale, device=piece.device, dtype=torch.float32)
            weight = (ry[:, None] * rx[None, :]).to(piece.device)  # (tile_h * out_scale, tile_w * out_scale)
            rows = slice(y * out_scale, y * out_scale + piece.shape[2])
            cols = slice(x0 * out_scale, x0 * out_scale + piece.shape[3])
            out[:, :, rows, cols] += weight * piece.float()
            total[:, :, rows, cols] += weight
    assert out is not None and total is not None  # tile_starts gives at least one tile
    return (out / total).to(piece.dtype)


def decode_tiled(vae: TileableVAE, z: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
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
    _check("decode_tiled", tile, overlap)
    c = vae.cfg.embed_dim
    if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != c:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise TilingError(f"decode_tiled: z must be a (B, {c}, h, w) latent, got {got}")
    h, w = z.shape[2:]
    if h <= tile and w <= tile:
        return vae.decode(z)
    return _blend_tiles(vae.decode, z, h, w, tile, overlap, 1, vae.cfg.downsample_factor)


def encode_tiled(vae: TileableVAE, x: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> DiagonalGaussian:
    """``vae.encode(x)`` computed tile by tile: the posterior of a large image in bounded memory.

    ``x``: (B, 3, H, W) in [-1, 1], H and W multiples of the downsample factor f. ``tile``
    and ``overlap`` count latent cells, as in :func:`decode_tiled` (a tile reads
    ``tile * f`` pixels). The encoder's moments (mean and log-variance) of overlapping tiles
    are blended with the same linear ramps, in latent space, and the blend is the returned
    :class:`~opensd.models.vae.DiagonalGaussian`. One tile is exactly ``vae.encode(x)``.
    """
    _check("encode_tiled", tile, overlap)
    f = vae.cfg.downsample_factor
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[2] % f or x.shape[3] % f:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise TilingError(f"encode_tiled: x must be a (B, C, H, W) image with H and W multiples of {f}, got {got}")
    h, w = x.shape[2] // f, x.shape[3] // f
    if h <= tile and w <= tile:
        return vae.encode(x)
    return DiagonalGaussian(_blend_tiles(lambda p: vae.encode(p).moments, x, h, w, tile, overlap, f, 1))
