"""A1111's "infotext": the generation parameters stored in a PNG's ``parameters`` chunk.

The format, as AUTOMATIC1111's web UI writes it::

    a red circle above a blue square
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Size: 64x64, Model hash: 0123456789, Model: opensd-shapes

The prompt may span several lines; the negative prompt line is present only when there
is one; the last line is ``key: value`` pairs separated by ``", "``. A value that holds a
comma, colon or quote is written as a JSON string.

Where it is stored, as A1111 stores it: a PNG's ``parameters`` text chunk (``tEXt``, or
``iTXt`` when it is not Latin-1); a JPEG's or WebP's EXIF ``UserComment``, ``UNICODE``
charset, UTF-16 big-endian (piexif's encoding). :func:`save_image` writes the format a
file's suffix names; :func:`read_parameters` reads any of them back from a file without
decoding its pixels, so it works on images too large to open.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, PngImagePlugin

from opensd.errors import InputFileError, OpenSDError

# The formats an output file may have, by suffix (PIL's format names).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
SAVE_QUALITY = 95  # JPEG and WebP quality

EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # the Exif sub-IFD pointer and its UserComment tag
_UNICODE, _ASCII = b"UNICODE\0", b"ASCII\0\0\0"  # UserComment charset prefixes (EXIF 2.3, 4.6.5)
JPEG_MAX_EXIF = 65533  # a JPEG APP1 segment's payload limit
MAX_PARAMETERS_BYTES = 16 * 2**20  # the largest stored infotext read back
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

NEGATIVE = "Negative prompt:"
# A1111's "Schedule type" of each sigma spacing (SigmaSpacing values); others: capitalized
SCHEDULE_TYPES = {"default": "Automatic", "sgm_uniform": "SGM Uniform"}
_REFINER = re.compile(r"^(.*?)(?: \[([0-9a-fA-F]{8,12})\])?$")
# key: value, where value is a JSON string or runs to the next ", " / end of line.
_PAIR = re.compile(r'\s*([\w \-/+]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    s = str(value)
    if any(c in s for c in ',:"\n'):
        return json.dumps(s)
    return s


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """The infotext for one image; ``params`` keep their order (``None`` values are left out)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE} {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def image_infotext(
    req: Any, seed: int, loaded: Any, refiner: tuple[str, float] | None = None, extra: Mapping[str, Any] | None = None,
    *, denoising: float | None = None,
) -> str:
    """A1111's infotext of one image of ``req`` (a :class:`~opensd.pipelines.request.GenerationRequest`)
    made by ``loaded`` (its ``hash`` and ``name``) with ``seed``; ``refiner``: (its label,
    the switch) when one ran; ``extra``: fields after the model's (``Lora hashes``, ``TI hashes``);
    ``denoising``: the ``Denoising strength`` written in its place whatever ``req``'s (the hires fix's)."""
    spec, spacing = req.resolved_sampler()
    params = {
        "Steps": req.steps,
        "Sampler": spec.a1111_name,
        "Schedule type": schedule_type(spacing.value),
        "CFG scale": req.cfg_scale,
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        "Model hash": loaded.hash,
        "Model": loaded.name,
        "Denoising strength": denoising if denoising is not None else (req.strength if req.strength < 1.0 else None),
        "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
        "CFG Rescale phi": req.guidance_rescale or None,
        "Refiner": refiner[0] if refiner is not None else None,
        "Refiner switch at": refiner[1] if refiner is not None else None,
        "VAE Decoder": req.resolved_decoder().a1111 if req.resolved_decoder().value == "tiny" else None,
        **(extra or {}),
    }
    return format_infotext(req.prompt, req.negative_prompt, params)


def parse_infotext(text: str) -> dict[str, str]:
    """Fields of an infotext: ``Prompt``, ``Negative prompt`` (maybe empty) and each parameter.

    Values stay strings, as A1111 reads them; the caller converts what it needs.
    """
    lines = text.strip("\n").split("\n")
    params_line = lines[-1] if len(lines) > 1 or _looks_like_params(lines[-1]) else ""
    if params_line and _looks_like_params(params_line):
        lines = lines[:-1]
    else:
        params_line = ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in lines:
        if line.startswith(NEGATIVE):
            target = negative_lines
            line = line[len(NEGATIVE):].lstrip()
        target.append(line)
    fields = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in _PAIR.findall(params_line):
        value = value.strip()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        fields[key.strip()] = value
    return fields


def schedule_type(spacing: str) -> str:
    """A1111's "Schedule type" label of a sigma spacing's value (``"karras"`` -> ``"Karras"``)."""
    return SCHEDULE_TYPES.get(spacing, spacing.capitalize())


def refiner_field(name: str, short_hash: str | None) -> str:
    """A1111's ``Refiner`` value: the checkpoint's short title ``name [hash]``."""
    return f"{name} [{short_hash}]" if short_hash else name


def parse_refiner(fields: Mapping[str, str]) -> tuple[str, str | None, float | None] | None:
    """``(name, short hash or None, switch at or None)`` of the refiner a parsed infotext
    names (A1111's ``Refiner`` and ``Refiner switch at``); None when it names none."""
    value = fields.get("Refiner")
    if not value:
        return None
    m = _REFINER.match(value.strip())
    assert m is not None  # the pattern matches any text
    switch: float | None = None
    try:
        switch = float(fields["Refiner switch at"]) if "Refiner switch at" in fields else None
    except ValueError:
        switch = None
    return m.group(1), m.group(2), switch


def _looks_like_params(line: str) -> bool:
    return len(_PAIR.findall(line)) >= 3 and "Steps:" in line


def image_format(path: str | Path, *, what: str = "the output path") -> str:
    """PIL's format name for the suffix of ``path``; a clear error for any other suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        got = f"suffix {suffix!r}" if suffix else "no suffix"
        raise OpenSDError(f"{what} {path} has {got}; give one of {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def save_image(image: Image.Image, path: str | Path, infotext: str | None, *, fmt: str | None = None) -> Path:
    """Save ``image`` in the format its suffix names (:data:`IMAGE_FORMATS`; ``fmt`` overrides it)
    with ``infotext`` inside: a PNG's ``parameters`` chunk, a JPEG's or WebP's EXIF UserComment."""
    path = Path(path)
    if not str(path).strip() or path.name == "":
        raise OpenSDError("the output path is empty; give a file name such as out.png")
    fmt = fmt or image_format(path)
    kwargs: dict[str, Any] = {}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        if infotext:
            info.add_text("parameters", infotext)
        kwargs["pnginfo"] = info
    else:
        kwargs["quality"] = SAVE_QUALITY
        if infotext:
            kwargs["exif"] = _exif_with_comment(infotext)
            if fmt == "JPEG" and len(kwargs["exif"]) > JPEG_MAX_EXIF:
                raise OpenSDError(
                    f"the generation parameters ({len(infotext)} characters) do not fit in a JPEG's EXIF "
                    f"(at most {JPEG_MAX_EXIF} bytes); write a .png or .webp"
                )
    if fmt != "PNG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)
    return path


def save_png(image: Image.Image, path: str | Path, infotext: str | None) -> Path:
    """Save a PNG, whatever the suffix, with the infotext in its ``parameters`` text chunk."""
    return save_image(image, path, infotext, fmt="PNG")


def read_png_parameters(path_or_image: str | Path | Image.Image) -> str | None:
    """The stored infotext of an image (:func:`read_parameters`; kept for PNG callers)."""
    return read_parameters(path_or_image)


def read_parameters(source: str | Path | Image.Image) -> str | None:
    """The infotext stored in a PNG, JPEG or WebP, or None when it has none.

    From a file, only the metadata is read (the PNG's chunks up to its end, the JPEG's
    segments up to its scan, the WebP's chunks), never the pixels: it works on images
    too large to decode. A corrupt or unknown file is an :class:`InputFileError`.
    """
    if isinstance(source, Image.Image):
        text = source.info.get("parameters")
        if isinstance(text, str):
            return text
        return _user_comment(source.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT))
    path = Path(source)
    if not path.is_file():
        raise InputFileError(f"image file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(12)
        if head.startswith(_PNG_SIGNATURE):
            f.seek(len(_PNG_SIGNATURE))
            return _png_parameters(f, path)
        if head.startswith(b"\xff\xd8"):
            f.seek(2)
            return _exif_parameters(_jpeg_exif(f, path), path)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _exif_parameters(_webp_exif(f, path), path)
    raise InputFileError(f"{path} is not a PNG, JPEG or WebP file")


# ----------------------------------------------------------------------------- EXIF UserComment


def _exif_with_comment(infotext: str) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = _UNICODE + infotext.encode("utf-16-be")
    return exif.tobytes()


def _user_comment(raw: Any) -> str | None:
    """A UserComment's text: UNICODE (UTF-16, big-endian as piexif writes it, else by its
    zero bytes), ASCII, or an undefined charset read as UTF-8."""
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw or None
    raw = bytes(raw)
    prefix, body = raw[:8], raw[8:]
    if prefix == _UNICODE:
        sample = body[:256]
        little = sample[1::2].count(0) > sample[0::2].count(0)  # ASCII's zero high bytes come second
        text = body.decode("utf-16-le" if little else "utf-16-be", errors="replace")
    elif prefix == _ASCII:
        text = body.decode("ascii", errors="replace")
    else:
        text = (body if len(raw) >= 8 else raw).decode("utf-8", errors="replace")
    text = text.rstrip("\0")
    return text or None


def _exif_parameters(exif_bytes: bytes | None, path: Path) -> str | None:
    if not exif_bytes:
        return None
    exif = Image.Exif()
    try:
        exif.load(exif_bytes)
        return _user_comment(exif.get_ifd(EXIF_IFD).get(USER_COMMENT))
    except (SyntaxError, ValueError, struct.error, KeyError, OSError) as e:
        raise InputFileError(f"{path}: its EXIF block is corrupt ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- containers, pixels skipped


def _read(f: BinaryIO, n: int, path: Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise InputFileError(f"{path} is truncated")
    return data


def _png_parameters(f: BinaryIO, path: Path) -> str | None:
    """The ``parameters`` text of a PNG's tEXt/zTXt/iTXt chunks; other chunks (the pixels) are skipped."""
    while True:
        head = f.read(8)
        if len(head) < 8:
            return None  # no IEND: a truncated file, but its text chunks were all there
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            return None
        if kind not in (b"tEXt", b"zTXt", b"iTXt") or length > MAX_PARAMETERS_BYTES:
            f.seek(length + 4, 1)
            continue
        data, crc = _read(f, length, path), _read(f, 4, path)
        if zlib.crc32(kind + data) != struct.unpack(">I", crc)[0]:
            raise InputFileError(f"{path}: its {kind.decode()} chunk is corrupt (CRC mismatch)")
        key, _, rest = data.partition(b"\0")
        if key != b"parameters":
            continue
        return _png_text(kind, rest, path)


def _png_text(kind: bytes, rest: bytes, path: Path) -> str:
    if kind == b"tEXt":
        return rest.decode("latin-1")
    if kind == b"zTXt":
        return _inflate(rest[1:], path).decode("latin-1")
    compressed, rest = rest[:1] == b"\1", rest[2:]  # iTXt: flag, method, language\0, keyword\0, text
    _, _, rest = rest.partition(b"\0")
    _, _, text = rest.partition(b"\0")
    return (_inflate(text, path) if compressed else text).decode("utf-8", errors="replace")


def _inflate(data: bytes, path: Path) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, MAX_PARAMETERS_BYTES)
    except zlib.error as e:
        raise InputFileError(f"{path}: its parameters chunk does not decompress ({e})") from None
    if d.unconsumed_tail:
        raise InputFileError(f"{path}: its parameters chunk inflates beyond {MAX_PARAMETERS_BYTES} bytes")
    return out


def _jpeg_exif(f: BinaryIO, path: Path) -> bytes | None:
    """The payload of a JPEG's ``Exif`` APP1 segment, from the segments before the scan."""
    while True:
        b = f.read(1)
        if not b:
            return None
        if b != b"\xff":
            raise InputFileError(f"{path}: not a valid JPEG (bad segment marker)")
        marker = f.read(1)
        while marker == b"\xff":
            marker = f.read(1)
        if not marker or marker in (b"\xd9", b"\xda"):  # end of image, start of scan
            return None
        if b"\xd0" <= marker <= b"\xd7" or marker == b"\x01":
            continue  # no length
        (length,) = struct.unpack(">H", _read(f, 2, path))
        if length < 2:
            raise InputFileError(f"{path}: not a valid JPEG (segment length {length})")
        if marker == b"\xe1":
            data = _read(f, length - 2, path)
            if data.startswith(b"Exif\0\0"):
                return data
        else:
            f.seek(length - 2, 1)


def _webp_exif(f: BinaryIO, path: Path) -> bytes | None:
    """The payload of a WebP's ``EXIF`` chunk."""
    f.seek(12)
    while True:
        head = f.read(8)
        if len(head) < 8:
            return None
        kind, size = struct.unpack("<4sI", head)
        if kind == b"EXIF":
            if size > MAX_PARAMETERS_BYTES:
                raise InputFileError(f"{path}: its EXIF chunk is {size} bytes, more than {MAX_PARAMETERS_BYTES}")
            return _read(f, size, path)
        f.seek(size + (size & 1), 1)
