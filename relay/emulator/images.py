"""Image helpers for the emulator's simulated nodes (Pillow).

Pictures are small and synthetic: enough for real files, real previews and believable
progress, cheap enough to make thousands of in a test run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from typing import Any

from PIL import Image, ImageDraw, ImageFilter, ImageOps, PngImagePlugin

__all__ = [
    "blend",
    "contain",
    "encode",
    "generated_art",
    "noise",
    "png_with_prompt",
    "solid",
    "tinted",
]

JPEG_PREVIEW_QUALITY = 95  # PROTOCOL.md §5: previews are JPEG quality 95 ...
PNG_PREVIEW_LEVEL = 1  # ... or PNG with compress_level=1.


def solid(width: int, height: int, color: int) -> Image.Image:
    """EmptyImage's picture: ``color`` is 0xRRGGBB."""
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
    return Image.new("RGB", (max(1, width), max(1, height)), rgb)


def tinted(image: Image.Image, step: int) -> Image.Image:
    """A copy of ``image`` with a hue shift that changes with ``step`` (SlowProgress previews)."""
    overlay = Image.new("RGB", image.size, _palette(step)[0])
    return Image.blend(image.convert("RGB"), overlay, 0.35)


def contain(image: Image.Image, max_size: int | None) -> Image.Image:
    """Fit into a ``max_size`` square keeping the aspect ratio; upscales too, as ComfyUI does."""
    if not max_size:
        return image
    return ImageOps.contain(image, (max_size, max_size))


def noise(width: int, height: int, seed: int) -> Image.Image:
    """Deterministic coloured noise."""
    data = hashlib.shake_256(f"noise:{seed}:{width}x{height}".encode()).digest(width * height * 3)
    return Image.frombytes("RGB", (width, height), data)


def blend(a: Image.Image, b: Image.Image, alpha: float) -> Image.Image:
    if a.size != b.size:
        b = b.resize(a.size)
    return Image.blend(a.convert("RGB"), b.convert("RGB"), max(0.0, min(1.0, alpha)))


def generated_art(width: int, height: int, seed: int, text: str) -> Image.Image:
    """What the emulated sampler 'generates': a gradient and shapes chosen by seed and prompt."""
    top, bottom, accent = _palette(seed, text)
    image = Image.new("RGB", (width, height), top)
    draw = ImageDraw.Draw(image)
    for y in range(0, height, max(1, height // 64)):
        t = y / max(1, height - 1)
        colour = tuple(int(top[i] + (bottom[i] - top[i]) * t) for i in range(3))
        draw.rectangle((0, y, width, y + max(1, height // 64)), fill=colour)
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    for i in range(6):
        cx = digest[i] / 255 * width
        cy = digest[i + 6] / 255 * height
        r = (0.08 + digest[i + 12] / 255 * 0.22) * min(width, height)
        shade = tuple(min(255, c + 40 * (i % 3)) for c in accent)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=shade)
    return image.filter(ImageFilter.GaussianBlur(radius=max(1, min(width, height) // 96)))


def encode(image: Image.Image, fmt: str, *, quality: int = 95, compress_level: int = 4) -> bytes:
    """Encode to ``PNG``, ``JPEG`` or ``WEBP`` bytes."""
    out = io.BytesIO()
    if fmt == "PNG":
        image.save(out, "PNG", compress_level=compress_level)
    elif fmt == "JPEG":
        image.convert("RGB").save(out, "JPEG", quality=quality)
    else:
        image.save(out, fmt, quality=quality)
    return out.getvalue()


def png_with_prompt(image: Image.Image, prompt: dict[str, Any] | None, compress_level: int) -> bytes:
    """PNG bytes with the graph embedded as a ``prompt`` text chunk, as ComfyUI's SaveImage does."""
    info = PngImagePlugin.PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    out = io.BytesIO()
    image.save(out, "PNG", pnginfo=info, compress_level=compress_level)
    return out.getvalue()


def _palette(*key: object) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]:
    digest = hashlib.sha256(repr(key).encode()).digest()
    hue = digest[0] / 255

    def colour(h: float, light: float) -> tuple[int, int, int]:
        return tuple(  # type: ignore[return-value]
            int(255 * max(0.0, min(1.0, light + 0.45 * math.cos(2 * math.pi * (h + k / 3)))))
            for k in range(3)
        )

    return colour(hue, 0.55), colour(hue + 0.25, 0.35), colour(hue + 0.5, 0.6)
