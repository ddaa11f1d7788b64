"""Scanned pages for the OCR tests: text drawn into an image with Pillow, the image the only
content of its PDF page (no text layer), and how much of a text an OCR got back."""

from __future__ import annotations

import io
import re

from PIL import Image, ImageDraw, ImageFont

DPI = 150  # the scans' resolution, and the one they are rendered back at: an image pixel is a rendered pixel


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def font() -> ImageFont.ImageFont:
    # Pillow's own scalable font (Pillow >= 10.1): no system font needed.
    return ImageFont.load_default(size=30)


def scan(lines: list[str], width: int = 1000, height: int = 360) -> Image.Image:
    """A page image with ``lines`` printed on it, black on white, like a clean scan."""
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    for number, line in enumerate(lines):
        draw.text((40, 40 + 70 * number), line, fill=0, font=font())
    return image


def scanned_pdf(images: list[Image.Image]) -> bytes:
    """A PDF with one image per page and no text layer (Pillow writes it)."""
    out = io.BytesIO()
    images[0].save(out, format="PDF", save_all=True, append_images=images[1:], resolution=DPI)
    return out.getvalue()


def recall(expected: str, found: str) -> float:
    """The share of the expected words that were found (case-insensitive, each as often as expected)."""
    remaining = words(found)
    hits = 0
    for word in words(expected):
        if word in remaining:
            remaining.remove(word)
            hits += 1
    return hits / len(words(expected))
