"""Connected components of a pixel mask, joining components of close hue, and a 3x3 dilation,
in numpy (for the scorer)."""

from __future__ import annotations

import numpy as np

from opensd.errors import OpenSDError


def label_components(mask: np.ndarray, key: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """8-connected components of boolean ``mask`` (H, W); with ``key``, neighbours join only if keys are equal.

    Returns (labels (H, W) int32 with -1 off the mask and 0..n-1 on it, n). A
    union-find over neighbour pairs with hooking to the smaller root and pointer
    jumping, all in numpy.
    """
    if mask.ndim != 2:
        raise OpenSDError(f"mask must be 2-D, got shape {mask.shape}")
    h, w = mask.shape
    flat = mask.ravel()
    idx = np.flatnonzero(flat)
    labels = np.full(h * w, -1, np.int32)
    if idx.size == 0:
        return labels.reshape(h, w), 0
    k = None if key is None else key.ravel()
    col = idx % w
    src, dst = [], []
    for off, ok in ((1, col < w - 1), (w, None), (w + 1, col < w - 1), (w - 1, col > 0)):
        j = idx + off
        keep = j < h * w if ok is None else (j < h * w) & ok
        s, t = idx[keep], j[keep]
        keep = flat[t]
        if k is not None:
            keep &= k[s] == k[t]
        src.append(s[keep])
        dst.append(t[keep])
    pos = np.empty(h * w, np.int64)
    pos[idx] = np.arange(idx.size)  # pixel -> compact node id
    a, b = pos[np.concatenate(src)], pos[np.concatenate(dst)]
    parent = np.arange(idx.size)
    while True:
        pa, pb = parent[a], parent[b]
        diff = pa != pb
        if not diff.any():
            break
        np.minimum.at(parent, np.maximum(pa[diff], pb[diff]), np.minimum(pa[diff], pb[diff]))
        while True:  # pointer jumping until every node points at its root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    roots, inverse = np.unique(parent, return_inverse=True)
    labels[idx] = inverse
    return labels.reshape(h, w), len(roots)


def dilate(m: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    v = m.copy()
    v[1:] |= m[:-1]
    v[:-1] |= m[1:]
    out = v.copy()
    out[:, 1:] |= v[:, :-1]
    out[:, :-1] |= v[:, 1:]
    return out


def merge_close_hues(labels: np.ndarray, n: int, a: np.ndarray, b: np.ndarray, tol: float) -> tuple[np.ndarray, int]:
    """Join touching components (``labels`` from :func:`label_components`) whose mean hues, from
    opponent coordinates ``a``, ``b`` (H, W), are within ``tol`` degrees.

    Pixels take the palette colour of nearest hue, so an object whose hue sits near the middle
    of two palette hues (a generated orange-red square) falls into two components; two objects
    of two palette colours differ by >= 31 degrees and stay apart. Returns (labels, n) relabelled
    0..n-1."""
    if n < 2:
        return labels, n
    on = labels >= 0
    idx = np.flatnonzero(on.ravel())
    lab = labels.ravel()[idx]
    mean_a = np.bincount(lab, a.ravel()[idx], n)
    mean_b = np.bincount(lab, b.ravel()[idx], n)
    hue = np.degrees(np.arctan2(mean_b, mean_a)) % 360
    h, w = labels.shape
    pairs: set[tuple[int, int]] = set()
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):  # each pixel and its 8-neighbour at (y + dy, x + dx)
        p = labels[: h - dy, max(0, -dx): w - max(0, dx)]
        q = labels[dy:, max(0, dx): w - max(0, -dx)]
        touch = (p >= 0) & (q >= 0) & (p != q)
        pairs.update(zip(p[touch].tolist(), q[touch].tolist(), strict=False))
    root = list(range(n))

    def find(i: int) -> int:
        while root[i] != i:
            i = root[i]
        return i

    for i, j in pairs:
        d = abs(float(hue[i]) - float(hue[j])) % 360
        if min(d, 360 - d) < tol:
            ri, rj = find(i), find(j)
            root[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(n)])
    uniq, new = np.unique(roots, return_inverse=True)
    out = labels.copy()
    out[on] = new[labels[on]]
    return out, len(uniq)
