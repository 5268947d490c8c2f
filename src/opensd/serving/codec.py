"""Base64 images in and out of the API.

In: a base64 PNG/JPEG/WebP, optionally as a ``data:image/...;base64,`` URL (what browsers
and ``webuiapi`` send); whitespace inside it (line-wrapped base64) is ignored. URLs are never fetched. Out: a base64 PNG whose ``parameters``
text chunk holds the infotext, so a saved file carries how it was made.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from opensd.serving.errors import ApiError


def decode_image(data: str, what: str, *, max_pixels: int) -> Image.Image:
    """The image in ``data``; a 400 :class:`ApiError` naming ``what`` when it is not one."""
    if not isinstance(data, str) or not data.strip():
        raise ApiError(400, f"{what} is empty; send a base64-encoded PNG or JPEG", param=what)
    text = data.strip()
    if text.startswith(("http://", "https://")):
        raise ApiError(400, f"{what} is a URL; this server does not fetch URLs, send the image as base64", param=what)
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise ApiError(400, f"{what} is a data URL without ';base64,'", param=what)
    text = "".join(text.split())  # MIME-wrapped base64 (base64.encodebytes, `base64` on Linux) has newlines
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{what} is not valid base64 ({e})", param=what) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
            w, h = im.size
            if w * h > max_pixels:
                raise ApiError(413, f"{what} is {w}x{h}; at most {max_pixels} pixels are accepted", param=what)
            im.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ApiError(400, f"{what} is not a readable image ({type(e).__name__}: {e})", param=what) from None
    return im


def encode_png(image: Image.Image, infotext: str | None = None) -> str:
    """Base64 PNG of ``image``; ``infotext`` (default: ``image.info["parameters"]``) goes in its ``parameters`` chunk."""
    text = infotext if infotext is not None else image.info.get("parameters")
    meta = None
    if text:
        meta = PngImagePlugin.PngInfo()
        meta.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")
