"""Image files in, stored bytes out, pixels back: what the builders store and what sources return.

Photos are stored *encoded* (JPEG/PNG bytes, usually the file as it was) and decoded with PIL when read:
52k In-shop photos then take about as much space as their JPEG files, not the ~10 GB of raw pixels.
Decoding always yields ``uint8 [H, W, 3]`` RGB:

- gray (``L``, ``I;16``, ...), palette and CMYK images are converted to RGB;
- images with transparency (``RGBA``, ``LA``, palette + transparency) are composited over white,
  because the pixels under a fully transparent area are arbitrary (often black) and product photos
  with a cut-out background are meant to be seen on white;
- the EXIF orientation of phone photos is applied once, when the file is stored.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from irgen_jax.errors import UserError

# File name endings a folder dataset reads (lower case); every other file is ignored (and counted).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})

# Formats stored as the original file bytes; anything else (BMP, TIFF, ...) is re-encoded as PNG,
# losslessly, so reading never depends on a rarer codec and uncompressed files do not bloat the data.
_KEEP_AS_IS = frozenset({"JPEG", "PNG", "WEBP"})


# How a builder's caller leaves unreadable files out (the main job's spelling; insert has its own flag).
SKIP_CORRUPT_OPTION = "--config.data.skip_corrupt=True"


class UnreadableImageError(UserError):
  """An image file that is missing, truncated or not an image PIL can decode; names the file."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"Cannot read image {path}: {reason}")
    self.path = path
    self.reason = reason


def encode_or_skip(path: str, skip_corrupt: bool, skipped: list[str], *,
                   option: str = SKIP_CORRUPT_OPTION) -> bytes | None:
  """``encode_file(path)``; an unreadable file is appended to ``skipped`` (→ None) when
  ``skip_corrupt``, else an error naming the file and ``option``, the flag that leaves it out."""
  try:
    return encode_file(path)
  except UnreadableImageError as e:
    if not skip_corrupt:
      raise UnreadableImageError(
          path, f"{e.reason} (pass {option} to leave unreadable files out)") from e
    skipped.append(path)
    return None


def encode_file(path: str) -> bytes:
  """Reads, fully decodes (to catch truncated files) and returns the bytes to store for ``path``.

  Raises ``UnreadableImageError`` naming the file when it is missing or cannot be decoded.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UnreadableImageError(path, e.strerror or str(e)) from e
  try:
    with Image.open(io.BytesIO(data)) as img:
      fmt = img.format
      img.load()  # a full decode: Image.open alone only reads the header
      orientation = img.getexif().get(0x0112, 1) if fmt in ("JPEG", "WEBP", "PNG") else 1
      if orientation != 1:
        img = ImageOps.exif_transpose(img)
        return _encode(img, "JPEG" if fmt == "JPEG" else "PNG")
      if fmt in _KEEP_AS_IS:
        return data
      return _encode(img, "PNG")
  except UnidentifiedImageError as e:
    raise UnreadableImageError(path, "not an image format PIL recognizes") from e
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    # PIL reports bad data as OSError ("image file is truncated"), ValueError or SyntaxError (some
    # header parsers).
    raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e


def _encode(img: Image.Image, fmt: str) -> bytes:
  # Modes the target format cannot hold (CMYK, 16-bit or float gray, ...) become RGB / 8-bit gray.
  keep = ("RGB", "L") if fmt == "JPEG" else ("RGB", "RGBA", "L", "LA", "P", "1")
  if img.mode not in keep:
    img = to_rgb(img)
  buf = io.BytesIO()
  img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buf.getvalue()


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL image as ``RGB``; transparency is composited over white."""
  if img.mode == "RGB":
    return img
  if img.mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    # 16/32-bit gray: scale to 8 bits by the type's range (PIL's convert("L") would clip instead).
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
    img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
  if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return img.convert("RGB")


def decode(data: bytes) -> np.ndarray:
  """Stored image bytes → ``uint8 [H, W, 3]`` RGB (see the module docstring for the conversions)."""
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(to_rgb(img))


def is_image_file(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
