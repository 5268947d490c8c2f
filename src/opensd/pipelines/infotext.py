"""A1111's "infotext": the generation parameters stored in a PNG's ``parameters`` chunk.

The format, as AUTOMATIC1111's web UI writes it::

    a red circle above a blue square
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Size: 64x64, Model hash: 0123456789, Model: opensd-shapes

The prompt may span several lines; the negative prompt line is present only when there
is one; the last line is ``key: value`` pairs separated by ``", "``. A value that holds a
comma, colon or quote is written as a JSON string.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from PIL import Image, PngImagePlugin

from opensd.errors import OpenSDError

NEGATIVE = "Negative prompt:"
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


def _looks_like_params(line: str) -> bool:
    return len(_PAIR.findall(line)) >= 3 and "Steps:" in line


def save_png(image: Image.Image, path: str | Path, infotext: str | None) -> Path:
    """Save a PNG with the infotext in its ``parameters`` text chunk."""
    path = Path(path)
    if not str(path).strip() or path.name == "":
        raise OpenSDError("the output path is empty; give a file name such as out.png")
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_parameters(path_or_image: str | Path | Image.Image) -> str | None:
    """The ``parameters`` chunk of a PNG, or None when it has none."""
    if isinstance(path_or_image, Image.Image):
        return path_or_image.info.get("parameters")
    with Image.open(path_or_image) as im:
        im.load()
        return im.info.get("parameters")
