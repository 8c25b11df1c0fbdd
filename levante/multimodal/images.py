"""Load an image from what a request names: a data URL, a local path, a file:// URL or an http(s) URL.

Every failure raises `InvalidRequest` (HTTP 400) with a message that says which
image source failed and why: not an image, truncated, too large (bytes or
pixels), unreachable, timed out, or a scheme levante does not fetch.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from levante.errors import InvalidRequest
from levante.net import FetchPolicy

MAX_BYTES = 20 * 1024 * 1024
TIMEOUT_S = 10.0
MAX_PIXELS = 8192 * 8192  # decompression-bomb guard; well above anything a vision tower resizes from
MIN_SIDE = 2  # a 1-pixel-wide image carries nothing a vision tower can see
IMAGE_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def load_image(source: str | bytes, *, max_bytes: int = MAX_BYTES, timeout: float = TIMEOUT_S,
               max_pixels: int = MAX_PIXELS, local_paths: bool | Sequence[Path] = True,
               fetch_policy: FetchPolicy = FetchPolicy.local()) -> Image.Image:
    """An RGB `PIL.Image` from raw bytes, a data URL, a path, a file:// URL or an http(s) URL.

    `local_paths`: True reads any file, False none, a list of folders only files inside them
    (a server on a public address must not read its own disk for anyone who asks).
    `fetch_policy`: which addresses an http(s) URL may reach (levante/net/policy.py); the
    default is a local caller's (a server passes its own)."""
    if isinstance(source, (bytes, bytearray)):
        return decode_image(bytes(source), "image bytes", max_bytes=max_bytes, max_pixels=max_pixels)
    if not isinstance(source, str) or not source:
        raise InvalidRequest("image: expected a data URL, a file path or an http(s) URL")
    what = _describe(source)
    if source.startswith("data:"):
        data = _data_url_bytes(source, max_bytes)
    elif source.startswith(("http://", "https://")):
        data = _fetch(source, max_bytes, timeout, fetch_policy)
    elif _SCHEME.match(source) and not source.startswith("file://"):
        scheme = source.split("://", 1)[0]
        raise InvalidRequest(f"image {what}: unsupported URL scheme '{scheme}' "
                             "(use data:, file://, http:// or https://, or a file path)")
    else:
        data = _read_file(_local_path(source, what, local_paths), what, max_bytes)
    return decode_image(data, what, max_bytes=max_bytes, max_pixels=max_pixels)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' `convert_to_rgb` makes it, for every family's processor: an image with an alpha
    band or a transparent colour is composited onto white (its transparent pixels white, not black)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, what: str = "image", *, max_bytes: int = MAX_BYTES,
                 max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode and fully load `data` into an RGB image, refusing oversized and broken files."""
    if len(data) > max_bytes:
        raise InvalidRequest(f"{what}: too large ({len(data)} bytes; the limit is {max_bytes})")
    if not data:
        raise InvalidRequest(f"{what}: empty, not an image")
    try:
        with warnings.catch_warnings():  # Pillow warns from 89 MP on; the cap below is ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidRequest(f"{what}: not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise InvalidRequest(f"{what}: too large ({e})") from None
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"{what}: cannot be read as an image ({e})") from None
    width, height = image.size  # from the header: nothing is decoded before these checks
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InvalidRequest(f"{what}: too small ({width}x{height} pixels; the minimum is {MIN_SIDE}x{MIN_SIDE})")
    if width * height > max_pixels:
        raise InvalidRequest(f"{what}: too large ({width}x{height} pixels; the limit is {max_pixels} pixels)")
    try:
        image.load()  # decode now: a truncated file fails here, not later inside the model
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = "truncated or corrupt" if "truncated" in str(e).lower() or isinstance(e, SyntaxError) \
            else "corrupt"
        raise InvalidRequest(f"{what}: {reason} image data ({e})") from None


def _describe(source: str) -> str:
    if source.startswith("data:"):
        return f"'{source[:30]}...'" if len(source) > 30 else f"'{source}'"
    return f"'{source}'" if len(source) <= 200 else f"'{source[:200]}...'"


def _data_url_bytes(url: str, max_bytes: int) -> bytes:
    what = _describe(url)
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise InvalidRequest(f"image {what}: malformed data URL (no ',' before the data)")
    params = header.split(";")
    mime = params[0].strip().lower()
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise InvalidRequest(f"image {what}: the data URL's type '{mime}' is not an image type")
    if len(payload) > max_bytes * 4 // 3 + 8:
        raise InvalidRequest(f"image {what}: too large (over {max_bytes} bytes; the limit is {max_bytes})")
    if "base64" in (p.strip().lower() for p in params[1:]):
        try:
            return base64.b64decode(payload.strip(), validate=False)
        except (binascii.Error, ValueError) as e:
            raise InvalidRequest(f"image {what}: bad base64 in the data URL ({e})") from None
    return unquote(payload).encode("latin-1", errors="replace")


def _local_path(source: str, what: str, local_paths: bool | Sequence[Path]) -> Path:
    """The file a path or file:// URL names, with symlinks and `..` resolved, if the policy
    allows it: one rule for both spellings (a file URL's host may only be empty or localhost)."""
    if source.startswith("file://"):
        url = urlparse(source)
        if url.netloc not in ("", "localhost"):
            raise InvalidRequest(f"image {what}: a file:// URL must name a local path (file:///...)")
        path = Path(unquote(url.path))
    else:
        path = Path(source)
    try:
        resolved = path.expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        raise InvalidRequest(f"image {what}: not a readable file path") from None
    if local_paths is True:
        return resolved
    folders = [] if local_paths is False else [Path(folder).resolve() for folder in local_paths]
    if not any(resolved.is_relative_to(folder) for folder in folders):
        where = "this server reads no local files" if not folders else \
            "allowed folders: " + ", ".join(str(folder) for folder in folders)
        raise InvalidRequest(f"image {what}: local paths outside the allowed folders are refused ({where}; "
                             "send a data URL or an http(s) URL)")
    return resolved


def _read_file(path: Path, what: str, max_bytes: int) -> bytes:
    try:
        if not path.is_file():
            raise InvalidRequest(f"image {what}: no such file")
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidRequest(f"image {what}: too large ({size} bytes; the limit is {max_bytes})")
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as e:
        raise InvalidRequest(f"image {what}: cannot be read ({e.strerror or e})") from None


def _fetch(url: str, max_bytes: int, timeout: float, policy: FetchPolicy) -> bytes:
    from levante.net.fetch import FetchFailed, FetchRefused, fetch

    try:
        return fetch(url, policy, max_bytes=max_bytes, timeout=timeout, accept=IMAGE_TYPES).body
    except (FetchRefused, FetchFailed) as e:
        raise InvalidRequest(f"image {_describe(url)}: {e}") from None


def image_hash_bytes(image: Image.Image) -> bytes:
    """The decoded pixels and size, for content hashes (same picture, different file -> same key)."""
    return f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode() + image.tobytes()


