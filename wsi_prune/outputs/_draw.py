"""Drawing primitives for the output pictures, in Pillow and numpy only: a colour map as a
lookup table, a colour bar, a legend and a title band.

Why not matplotlib: a figure per picture cost 0.44-0.57 s per picture, 1.1 s per slide for
the two (figure set-up, Agg rendering, ``bbox_inches="tight"``, Pillow's five-filter PNG
encoder), about as much as the whole pruned ViT on a slide with few kept tiles; drawing into
a uint8 array and :func:`save_png` take 0.07-0.15 s per picture (docs/benchmarks.md,
"Pictures without matplotlib").
"""

from __future__ import annotations

import functools
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: matplotlib's ``inferno`` sampled at 256 points, (256, 3) uint8 RGB (generated with
#: ``(matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5)``;
#: tests/outputs check it still matches)
INFERNO = np.frombuffer(bytes.fromhex(
    "00000401000501010601010802010a02020c02020e03021004031204031405041706041907051b08051d09061f0a0722"
    "0b07240c08260d08290e092b10092d110a30120a32140b34150b37160b39180c3c190c3e1b0c411c0c431e0c451f0c48"
    "210c4a230c4c240c4f260c51280b53290b552b0b572d0b592f0a5b310a5c320a5e340a5f3609613809623909633b0964"
    "3d09653e0966400a67420a68440a68450a69470b6a490b6a4a0c6b4c0c6b4d0d6c4f0d6c510e6c520e6d540f6d550f6d"
    "57106e59106e5a116e5c126e5d126e5f136e61136e62146e64156e65156e67166e69166e6a176e6c186e6d186e6f196e"
    "71196e721a6e741a6e751b6e771c6d781c6d7a1d6d7c1d6d7d1e6d7f1e6c801f6c82206c84206b85216b87216b88226a"
    "8a226a8c23698d23698f24699025689225689326679526679727669827669a28659b29649d29649f2a63a02a63a22b62"
    "a32c61a52c60a62d60a82e5fa92e5eab2f5ead305dae305cb0315bb1325ab3325ab43359b63458b73557b93556ba3655"
    "bc3754bd3853bf3952c03a51c13a50c33b4fc43c4ec63d4dc73e4cc83f4bca404acb4149cc4248ce4347cf4446d04545"
    "d24644d34743d44842d54a41d74b3fd84c3ed94d3dda4e3cdb503bdd513ade5238df5337e05536e15635e25734e35933"
    "e45a31e55c30e65d2fe75e2ee8602de9612bea632aeb6429eb6628ec6726ed6925ee6a24ef6c23ef6e21f06f20f1711f"
    "f1731df2741cf3761bf37819f47918f57b17f57d15f67e14f68013f78212f78410f8850ff8870ef8890cf98b0bf98c0a"
    "f98e09fa9008fa9207fa9407fb9606fb9706fb9906fb9b06fb9d07fc9f07fca108fca309fca50afca60cfca80dfcaa0f"
    "fcac11fcae12fcb014fcb216fcb418fbb61afbb81dfbba1ffbbc21fbbe23fac026fac228fac42afac62df9c72ff9c932"
    "f9cb35f8cd37f8cf3af7d13df7d340f6d543f6d746f5d949f5db4cf4dd4ff4df53f4e156f3e35af3e55df2e661f2e865"
    "f2ea69f1ec6df1ed71f1ef75f1f179f2f27df2f482f3f586f3f68af4f88ef5f992f6fa96f8fb9af9fc9dfafda1fcffa4"
), np.uint8).reshape(256, 3)

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


@functools.lru_cache(maxsize=8)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px (FreeType when Pillow has it, else the bitmap
    font)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def colormap(values: np.ndarray, lut: np.ndarray = INFERNO) -> np.ndarray:
    """(..., 3) uint8 colours of ``values`` in [0, 1] (clipped; NaN takes entry 0), indexed as
    matplotlib indexes a 256-entry map: ``floor(v * 256)``, 1.0 in the last entry."""
    v = np.nan_to_num(np.asarray(values, np.float32) * 256, nan=0.0)
    idx = np.clip(v, 0, 255).astype(np.uint8)
    return np.take(lut, idx, axis=0)


def blend(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    """``colour`` over ``base`` at opacity ``alpha`` in [0, 1] (a scalar or (H, W)): both
    (H, W, 3) uint8 -> (H, W, 3) uint8. Integer arithmetic in 1/256 steps (uint16 holds
    255 * 256), which is 3x faster than float32 and differs from it by at most 1 level."""
    a = np.round(np.asarray(alpha, np.float32) * 256).astype(np.uint16)
    if a.ndim:
        a = a[..., None]
    out = base.astype(np.uint16) * (256 - a)
    out += colour.astype(np.uint16) * a
    out += 128
    return (out >> 8).astype(np.uint8)


def save_png(path: str | Path, rgb: np.ndarray, level: int = 1) -> None:
    """Write (H, W, 3) uint8 as an 8-bit RGB PNG: every row with the "Sub" filter, zlib at
    ``level``.

    Why not ``PIL.Image.save``: Pillow tries the five PNG filters on every row and keeps the
    best, which on a 1100 px picture of H&E costs ~110 ms at zlib level 1; one filter
    computed with numpy costs ~45 ms for a file about 10 % larger.
    """
    rgb = np.ascontiguousarray(rgb, np.uint8)
    h, w = rgb.shape[:2]
    rows = np.empty((h, w * 3 + 1), np.uint8)
    rows[:, 0] = 1  # filter type Sub: each byte minus the same channel of the pixel before
    flat = rgb.reshape(h, w * 3)
    rows[:, 1:4] = flat[:, :3]
    np.subtract(flat[:, 3:], flat[:, :-3], out=rows[:, 4:])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bit, RGB, no interlace
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                 + chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + chunk(b"IEND", b""))


def text_size(draw: ImageDraw.ImageDraw, text: str, fnt) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=fnt)
    return x1 - x0, y1 - y0


def frame(img: np.ndarray, title: str, right: int = 0, pad: int = 8
          ) -> tuple[Image.Image, int, int]:
    """The picture on a white canvas with ``title`` centred above it and ``right`` px free on
    its right (for a colour bar). Returns ``(canvas, x0, y0)``: where the picture's top-left
    lies on the canvas."""
    h, w = img.shape[:2]
    fnt = font(15)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tw, th = text_size(probe, title, fnt)
    top = th + 2 * pad
    canvas = Image.new("RGB", (max(w + right, tw) + 2 * pad, h + top + pad), WHITE)
    canvas.paste(Image.fromarray(img), (pad, top))
    draw = ImageDraw.Draw(canvas)
    draw.text(((canvas.width - tw) // 2, pad), title, fill=BLACK, font=fnt)
    return canvas, pad, top


def colourbar(canvas: Image.Image, x: int, y: int, height: int, label: str,
              lut: np.ndarray = INFERNO, width: int = 16) -> None:
    """A vertical colour bar for [0, 1] at (x, y), ``height`` px tall, with ticks every 0.25
    and ``label`` written upwards to its right."""
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(width, axis=1)
    canvas.paste(Image.fromarray(colormap(ramp, lut)), (x, y))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((x, y, x + width - 1, y + height - 1), outline=BLACK)
    fnt = font(12)
    tick_w = 0
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        ty = y + round((1 - v) * (height - 1))
        draw.line((x + width, ty, x + width + 3, ty), fill=BLACK)
        s = f"{v:g}"
        tw, th = text_size(draw, s, fnt)
        tick_w = max(tick_w, tw)
        draw.text((x + width + 5, ty - th // 2 - 2), s, fill=BLACK, font=fnt)
    tw, th = text_size(draw, label, fnt)
    strip = Image.new("RGB", (tw + 4, th + 6), WHITE)
    ImageDraw.Draw(strip).text((2, 0), label, fill=BLACK, font=fnt)
    strip = strip.rotate(90, expand=True)
    lx = x + width + 8 + tick_w
    canvas.paste(strip, (lx, y + max(0, (height - strip.height) // 2)))


def colourbar_width(label: str, width: int = 16) -> int:
    """Px a :func:`colourbar` with this label takes right of the picture, margins included."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    fnt = font(12)
    tick_w = text_size(probe, "0.75", fnt)[0]
    return 12 + width + 8 + tick_w + text_size(probe, label, fnt)[1] + 10


def legend(canvas: Image.Image, right: int, bottom: int,
           entries: list[tuple[str, tuple[int, ...], str]]) -> None:
    """A legend box whose bottom-right corner is at (right, bottom): one row per
    ``(label, rgb, "line" | "patch")``."""
    draw = ImageDraw.Draw(canvas, "RGBA")
    fnt = font(12)
    sizes = [text_size(draw, label, fnt) for label, _, _ in entries]
    row = max(h for _, h in sizes) + 6
    w = 28 + max(tw for tw, _ in sizes) + 8
    h = row * len(entries) + 6
    x0, y0 = right - w, bottom - h
    draw.rectangle((x0, y0, right, bottom), fill=(255, 255, 255, 200), outline=(160, 160, 160))
    for k, (label, rgb, kind) in enumerate(entries):
        cy = y0 + 3 + k * row + row // 2
        if kind == "line":
            draw.line((x0 + 6, cy, x0 + 22, cy), fill=tuple(rgb[:3]), width=2)
        else:
            draw.rectangle((x0 + 6, cy - 5, x0 + 22, cy + 5), fill=tuple(rgb))
        draw.text((x0 + 28, cy - sizes[k][1] // 2 - 2), label, fill=BLACK, font=fnt)


def outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool, the pixels of ``mask`` that touch a pixel outside it (4-neighbours; the
    image border counts as outside): a one-pixel contour."""
    m = np.pad(np.asarray(mask, bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return m[1:-1, 1:-1] & ~inner
