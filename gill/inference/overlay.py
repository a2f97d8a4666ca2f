"""Draw a layout (boxes + Chinese labels) over an image, for checking generated layouts by eye.

Labels are Chinese, and PIL's built-in font has no CJK glyphs (it draws boxes/tofu), so the font
comes from a pip package that ships Noto Sans SC (``pylopdf-fonts-zh-cn``, SIL OFL). Without it we
still draw, with PIL's default font and a warning, rather than fail an inference run over a preview.
"""
from __future__ import annotations

import functools
import warnings
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours that stay visible on both light and dark images.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128),
)


@functools.lru_cache(maxsize=1)
def cjk_font_path() -> str | None:
    """Path of the bundled Noto Sans SC font, or None when the font package is not installed."""
    try:
        import pylopdf_fonts_zh_cn
    except ImportError:
        return None
    path = pylopdf_fonts_zh_cn.sans_path()
    return str(path) if path.is_file() else None


@functools.lru_cache(maxsize=16)
def load_font(size: int) -> ImageFont.ImageFont:
    path = cjk_font_path()
    if path is not None:
        return ImageFont.truetype(path, size)
    warnings.warn(
        "no CJK font found (pip install pylopdf-fonts-zh-cn); Chinese labels will render as boxes",
        RuntimeWarning,
        stacklevel=3,
    )
    return ImageFont.load_default(size)


def draw_layout(
    image: Image.Image,
    objects: Sequence[tuple[str, Sequence[float]]],
    *,
    line_width: int | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """A copy of ``image`` with each ``(label, normalized x1,y1,x2,y2)`` box outlined and labelled.

    The label sits on a filled tab in the box's colour just inside the top-left corner, so it stays
    on the canvas for boxes touching the top edge. All tabs are drawn before any outline, so no tab
    (a box's own, or a neighbour's) ever hides a box edge.
    """
    out = image.convert("RGB")  # convert() copies: the caller's image is never drawn on
    w, h = out.size
    line_width = line_width or max(1, round(min(w, h) / 128))
    font = load_font(font_size or max(10, round(min(w, h) / 24)))
    draw = ImageDraw.Draw(out)
    # x2 = 1.0 maps to pixel w, one past the canvas: clamp so border-touching edges stay visible
    rects = [(box[0] * w, box[1] * h, min(box[2] * w, w - 1), min(box[3] * h, h - 1)) for _, box in objects]
    for i, ((label, _), (x1, y1, _, _)) in enumerate(zip(objects, rects)):
        if label:
            l, t, r, b = draw.textbbox((x1 + line_width, y1 + line_width), label, font=font)
            draw.rectangle((l - 1, t - 1, r + 1, b + 1), fill=PALETTE[i % len(PALETTE)])
            draw.text((x1 + line_width, y1 + line_width), label, font=font, fill=(255, 255, 255))
    for i, rect in enumerate(rects):
        draw.rectangle(rect, outline=PALETTE[i % len(PALETTE)], width=line_width)
    return out
