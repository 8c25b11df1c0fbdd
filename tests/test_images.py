"""load_image: data URLs, paths, file:// and http(s) URLs; every failure a clear InvalidRequest."""
from __future__ import annotations

import base64
import http.server
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from levante.errors import InvalidRequest
from levante.multimodal.images import load_image


def _png(width=7, height=5, mode="RGB") -> bytes:
    image = Image.new(mode, (width, height))
    image.putdata([((x * 37) % 256, (x * 11) % 256, (x * 5) % 256)[:len(mode)] if mode != "L" else x % 256
                   for x in range(width * height)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(width=16, height=12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_data_url_path_file_url_and_bytes_agree(tmp_path):
    data = _png()
    path = tmp_path / "pic.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    images = [load_image(url), load_image(str(path)), load_image(path.as_uri()), load_image(data)]
    for image in images:
        assert image.mode == "RGB" and image.size == (7, 5)
        assert image.tobytes() == images[0].tobytes()
    assert images[0].tobytes() == Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_grayscale_and_transparent_become_rgb():
    assert load_image(_png(mode="L")).mode == "RGB"
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    image = load_image(buffer.getvalue())
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


def _random_png(mode: str) -> tuple[bytes, Image.Image]:
    rng = np.random.default_rng(3)
    bands = {"RGBA": 4, "LA": 2, "RGB": 3, "L": 1, "P": 1}[mode]
    pixels = rng.integers(0, 256, (9, 13, bands), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if bands == 1 else pixels, "L" if mode == "P" else mode)
    if mode == "P":
        image = image.convert("P")
        image.info["transparency"] = 7
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **({"transparency": 7} if mode == "P" else {}))
    return buffer.getvalue(), Image.open(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB", "L"])
def test_every_alpha_is_composited_as_transformers_does(mode):
    """One RGB conversion for every image road and family, transformers' (issue 28: a grey-and-alpha PNG lost
    its transparency through the server, and Gemma's processors dropped any image's alpha)."""
    from transformers.image_transforms import convert_to_rgb

    from levante.multimodal.images import to_rgb

    data, opened = _random_png(mode)
    expected = convert_to_rgb(opened, return_numpy=True)
    assert (np.asarray(load_image(data)) == expected).all()
    assert (np.asarray(to_rgb(opened)) == expected).all()


@pytest.mark.parametrize("source, message", [
    ("data:image/png;base64,aGVsbG8gd29ybGQ=", "not an image"),
    ("data:text/plain;base64,aGVsbG8=", "not an image type"),
    ("data:image/png;base64", "malformed data URL"),
    ("ftp://example.com/a.png", "unsupported URL scheme"),
    ("/no/such/file.png", "no such file"),
])
def test_bad_sources(source, message):
    with pytest.raises(InvalidRequest, match=message):
        load_image(source)


def test_truncated_and_not_an_image_files(tmp_path):
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(_jpeg()[:-60])
    with pytest.raises(InvalidRequest, match="truncated"):
        load_image(str(truncated))
    text = tmp_path / "notes.png"
    text.write_text("just some text, no pixels here")
    with pytest.raises(InvalidRequest, match="not an image"):
        load_image(str(text))


def test_too_large_bytes_and_pixels(tmp_path):
    data = _png(64, 64)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    for source in (str(path), data, "data:image/png;base64," + base64.b64encode(data).decode()):
        with pytest.raises(InvalidRequest, match="too large"):
            load_image(source, max_bytes=len(data) - 1)
    with pytest.raises(InvalidRequest, match="too large .*pixels"):
        load_image(data, max_pixels=64 * 64 - 1)


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        body, delay, status = self.routes.get(self.path, (b"", 0, 404))
        time.sleep(delay)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http(http_server):
    data = _png()
    _Handler.routes.update({"/pic.png": (data, 0, 200), "/slow.png": (data, 1.5, 200),
                            "/big.png": (data * 50, 0, 200)})
    assert load_image(f"{http_server}/pic.png").tobytes() == load_image(data).tobytes()
    with pytest.raises(InvalidRequest, match="HTTP 404"):
        load_image(f"{http_server}/missing.png")
    with pytest.raises(InvalidRequest, match="timed out"):
        load_image(f"{http_server}/slow.png", timeout=0.3)
    with pytest.raises(InvalidRequest, match="too large"):
        load_image(f"{http_server}/big.png", max_bytes=len(data) * 10)


def test_unreachable():
    with pytest.raises(InvalidRequest, match="unreachable"):
        load_image("http://127.0.0.1:9/pic.png", timeout=2)


def test_local_paths_can_be_confined_to_folders(tmp_path):
    inside, outside = tmp_path / "media", tmp_path / "private"
    inside.mkdir(), outside.mkdir()
    for folder in (inside, outside):
        Image.new("RGB", (4, 3), (10, 20, 30)).save(folder / "a.png")
    assert load_image(str(inside / "a.png"), local_paths=[inside]).size == (4, 3)
    assert load_image(f"file://{inside / 'a.png'}", local_paths=[inside]).size == (4, 3)
    for source in (str(outside / "a.png"), str(inside / ".." / "private" / "a.png"), f"file://{outside / 'a.png'}"):
        with pytest.raises(InvalidRequest, match="outside the allowed folders"):
            load_image(source, local_paths=[inside])
    with pytest.raises(InvalidRequest, match="reads no local files"):
        load_image(str(inside / "a.png"), local_paths=False)
    with pytest.raises(InvalidRequest, match="reads no local files"):  # no probing for which files exist
        load_image(str(tmp_path / "missing.png"), local_paths=False)


def test_serve_confines_local_media_paths_on_public_addresses(tmp_path):
    from levante.serve.server import local_media_policy

    assert local_media_policy("127.0.0.1", None) is True
    assert local_media_policy("0.0.0.0", None) is False
    assert local_media_policy("0.0.0.0", [str(tmp_path)]) == [tmp_path]
    with pytest.raises(InvalidRequest, match="not a folder"):
        local_media_policy("127.0.0.1", [str(tmp_path / "nope")])


def test_symlinks_and_dot_dot_are_resolved_before_the_folder_check(tmp_path):
    """One rule for paths and file:// URLs: the resolved file must lie inside an allowed folder."""
    media, private = tmp_path / "media", tmp_path / "private"
    media.mkdir(), private.mkdir()
    Image.new("RGB", (4, 3)).save(private / "secret.png")
    Image.new("RGB", (2, 2)).save(media / "ok.png")
    (media / "link.png").symlink_to(private / "secret.png")  # a file link out of the folder
    (media / "door").symlink_to(private, target_is_directory=True)  # a folder link out of it
    (private / "back.png").symlink_to(media / "ok.png")  # a link from outside into the folder
    escapes = [media / "link.png", media / "door" / "secret.png", f"{media}/../private/secret.png",
               f"{media}/door/../../private/secret.png"]
    for path in escapes:
        for source in (str(path), f"file://{path}", f"file://localhost{path}"):
            with pytest.raises(InvalidRequest, match="outside the allowed folders"):
                load_image(source, local_paths=[media])
    assert load_image(str(private / "back.png"), local_paths=[media]).size == (2, 2)  # it is a media file
    with pytest.raises(InvalidRequest, match="must name a local path"):
        load_image(f"file://otherhost{media}/ok.png", local_paths=[media])
    with pytest.raises(InvalidRequest, match="not a readable file path"):
        load_image(f"{media}/a\0b.png", local_paths=[media])


def png_declaring(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header declares width x height RGB pixels (its data: one empty block)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_pixel_cap_applies_before_decoding():
    """A small file declaring 144 megapixels (432 MB decoded) is refused from its header alone."""
    import resource

    data = png_declaring(12000, 12000)
    assert len(data) < 100
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        with pytest.raises(InvalidRequest, match="too large .*12000x12000 pixels"):
            load_image(data)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 50_000  # KiB: nothing was allocated


@pytest.mark.parametrize("source, message", [
    (_png(1, 1), "too small .*1x1"), (_png(1, 40), "too small"), (b"", "empty"),
    ("data:image/png;base64,", "empty"), (png_declaring(0, 0), "not an image|too small"),
])
def test_degenerate_images_are_invalid_requests(source, message):
    with pytest.raises(InvalidRequest, match=message):
        load_image(source)
