"""The media fetcher against a real loopback HTTP server and raw listeners: what it fetches, what it
refuses, and that a refused target never even sees a connection."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from qwen_gateway.errors import (
    ImageSizeInvalid,
    MediaDownloadFailed,
    MediaDownloadTimeout,
    MediaError,
    MediaFormatInvalid,
    MediaTooLarge,
    MediaURLRefused,
    VideoLimitExceeded,
)
from qwen_gateway.media import FetchedImage, MediaFetcher, gather
from qwen_gateway.settings import MediaSettings
from tests.media_support import CountingListener, MediaServer, bomb_png, jpeg_bytes, png_bytes

T = TypeVar("T")
PREFIX = "<400> InternalError.Algo.InvalidParameter: "


def run(settings: MediaSettings, call: Callable[[MediaFetcher], Awaitable[T]]) -> T:
    async def main() -> T:
        fetcher = MediaFetcher(settings)
        try:
            return await call(fetcher)
        finally:
            await fetcher.aclose()

    return asyncio.run(main())


def fetch_image(url: str, **settings: Any) -> FetchedImage:
    return run(MediaSettings(**settings), lambda f: f.image(url))


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


LOOPBACK = {"allow_hosts": ("127.0.0.1",)}


# --- downloads ---------------------------------------------------------------------------------------


def test_allowed_host_fetch_reads_the_image(media_server: MediaServer) -> None:
    image = fetch_image(media_server.url("/img.png"), **LOOPBACK)
    assert (image.mime_type, image.width, image.height) == ("image/png", 40, 30)
    assert image.data == png_bytes()
    # The type comes from the bytes, not from the server's Content-Type.
    assert fetch_image(media_server.url("/photo.jpg"), **LOOPBACK).mime_type == "image/jpeg"


def test_redirects_are_followed_and_capped(media_server: MediaServer) -> None:
    assert fetch_image(media_server.url("/chain/2"), max_redirects=3, **LOOPBACK).width == 40
    with pytest.raises(MediaDownloadFailed):
        fetch_image(media_server.url("/chain/3"), max_redirects=3, **LOOPBACK)
    with pytest.raises(MediaDownloadFailed):
        fetch_image(media_server.url("/chain/0"), max_redirects=0, **LOOPBACK)
    # Every hop was a real request to the server: 3 chain hops + the image, then no fourth hop.
    assert media_server.hits["/chain/3"] == 1 and media_server.hits["/chain/0"] == 3


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.2:{port}/x.png",
        "http://2130706434:{port}/x.png",  # 127.0.0.2 in decimal
        "http://0x7f.0.0.2:{port}/x.png",
        "http://[::ffff:127.0.0.2]:{port}/x.png",
    ],
)
def test_redirect_from_allowed_host_to_private_address_is_refused(
    media_server: MediaServer, listener_factory: type[CountingListener], target: str
) -> None:
    private = listener_factory("127.0.0.2")
    location = target.format(port=private.port)
    with pytest.raises(MediaURLRefused):
        fetch_image(media_server.url(f"/redirect?to={location}"), **LOOPBACK)
    assert media_server.hits["/redirect"] == 1  # the allowed first hop was fetched
    assert private.connections() == 0


def test_not_allow_listed_loopback_listener_sees_zero_connections(
    listener_factory: type[CountingListener],
) -> None:
    v4 = listener_factory("127.0.0.1")
    v6 = listener_factory("::1")
    urls = [
        f"http://127.0.0.1:{v4.port}/x.png",
        f"http://127.1:{v4.port}/x.png",
        f"http://2130706433:{v4.port}/x.png",
        f"http://0x7f000001:{v4.port}/x.png",
        f"http://0177.0.0.1:{v4.port}/x.png",
        f"http://[::ffff:127.0.0.1]:{v4.port}/x.png",
        f"http://localhost:{v4.port}/x.png",
        f"http://localhost.:{v4.port}/x.png",
        f"http://allowed@127.0.0.1:{v4.port}/x.png",
        f"https://127.0.0.1:{v4.port}/x.png",
        f"http://[::1]:{v6.port}/x.png",
    ]
    for url in urls:
        with pytest.raises(MediaURLRefused):
            fetch_image(url, allow_hosts=("10.0.0.0/8", "images.internal"))
    assert v4.connections() == 0
    assert v6.connections() == 0
    # The counter does count: the same fetch with the address allow-listed reaches the listener.
    with pytest.raises(MediaError):
        fetch_image(f"http://127.0.0.1:{v4.port}/x.png", allow_hosts=("127.0.0.1",), fetch_timeout=0.5)
    assert v4.connections() == 1


def test_frame_list_over_the_cap_is_refused_before_any_fetch(
    listener_factory: type[CountingListener],
) -> None:
    listener = listener_factory("127.0.0.1")
    urls = [f"http://127.0.0.1:{listener.port}/{i}.png" for i in range(7)]
    settings = MediaSettings(allow_hosts=("127.0.0.1",), max_video_frames=6)
    with pytest.raises(VideoLimitExceeded) as err:
        run(settings, lambda f: f.video_frames(urls))
    assert err.value.message == PREFIX + "The range of sequence images shoule be (4, 6)."
    assert listener.connections() == 0


def test_download_size_cap(media_server: MediaServer) -> None:
    # Declared too large: refused from the header. Undeclared (read until close): cut off at the cap.
    for path in ("/big.png", "/endless"):
        with pytest.raises(MediaTooLarge) as err:
            fetch_image(media_server.url(path), max_image_bytes=100_000, **LOOPBACK)
        assert err.value.message == PREFIX + "The multimodal file exceeds the size limit of 100000 bytes."
    assert fetch_image(media_server.url("/big.png"), max_image_bytes=300_000, **LOOPBACK).width == 40


def test_stalled_server_hits_the_total_deadline(media_server: MediaServer) -> None:
    with pytest.raises(MediaDownloadTimeout) as err:
        fetch_image(media_server.url("/stall"), fetch_timeout=1.0, **LOOPBACK)
    assert err.value.message == PREFIX + "Download multimodal file timed out"


def test_trickling_server_hits_the_total_deadline(media_server: MediaServer) -> None:
    # Every read gets a byte within 50 ms, so only a deadline over the whole download stops it.
    with pytest.raises(MediaDownloadTimeout):
        fetch_image(media_server.url("/trickle"), fetch_timeout=1.0, **LOOPBACK)


def test_proxy_environment_is_ignored(
    media_server: MediaServer, listener_factory: type[CountingListener], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy would be a second party choosing the destination: the fetcher always dials the target.
    proxy = listener_factory("127.0.0.1")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
    assert fetch_image(media_server.url("/img.png"), **LOOPBACK).width == 40
    assert proxy.connections() == 0


def test_failed_downloads_share_one_message(media_server: MediaServer) -> None:
    for path in ("/missing.png", "/gzip"):
        with pytest.raises(MediaDownloadFailed) as err:
            fetch_image(media_server.url(path), **LOOPBACK)
        assert err.value.message == PREFIX + "Failed to download multimodal content"
    with pytest.raises(MediaFormatInvalid):
        fetch_image(media_server.url("/text.png"), **LOOPBACK)


def test_gather_cancels_the_rest_on_the_first_failure(media_server: MediaServer) -> None:
    # The stall never ends on its own: if gather waited for it, the test would hang (pytest timeout).
    async def both(f: MediaFetcher) -> list[FetchedImage]:
        return await gather(f.image(media_server.url("/stall")), f.image(media_server.url("/text.png")))

    with pytest.raises(MediaFormatInvalid):
        run(MediaSettings(fetch_timeout=600, **LOOPBACK), both)

    async def good(f: MediaFetcher) -> list[FetchedImage]:
        return await gather(*(f.image(media_server.url(p)) for p in ("/img.png", "/photo.jpg", "/img.png")))

    got = run(MediaSettings(**LOOPBACK), good)
    assert [i.mime_type for i in got] == ["image/png", "image/jpeg", "image/png"]


def test_downloads_in_flight_are_bounded(media_server: MediaServer) -> None:
    async def five(f: MediaFetcher) -> list[FetchedImage]:
        pending = asyncio.gather(*(f.image(media_server.url("/hold")) for _ in range(5)))
        while media_server.active < 2:  # the server holds each request until released
            await asyncio.sleep(0.01)
        media_server.release.set()
        return await pending

    got = run(MediaSettings(max_parallel_downloads=2, fetch_timeout=600, **LOOPBACK), five)
    assert len(got) == 5 and media_server.hits["/hold"] == 5
    assert media_server.max_active == 2


# --- data: URLs and image checks ----------------------------------------------------------------------


def test_data_url_cap_is_checked_before_decoding() -> None:
    cap = 10 * 1024 * 1024
    # Exactly at the cap is accepted (a PNG with padding after IEND, which decoders ignore).
    image = png_bytes()
    at_cap = image + b"\x00" * (cap - len(image))
    assert fetch_image(data_url(at_cap)).width == 40
    for url in (data_url(at_cap + b"\x00"), "data:image/png;base64," + "A" * 20_000_000):
        with pytest.raises(MediaTooLarge) as err:
            fetch_image(url)
        assert err.value.message == "Exceeded limit on max bytes per data-uri item : 10485760"


@pytest.mark.parametrize(
    "url",
    [
        data_url(b"GIF89a but not really" * 3),
        data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>" * 2, "image/svg+xml"),
        data_url(b"%PDF-1.4 nothing to see" * 3, "image/png"),
        data_url(png_bytes()[:60]),  # a real PNG header, truncated body
        "data:image/png,not-base64",
        "data:image/png;base64,@@@@",
    ],
)
def test_bytes_that_are_not_a_whole_image_are_refused(url: str) -> None:
    with pytest.raises(MediaFormatInvalid) as err:
        fetch_image(url)
    assert err.value.message == PREFIX + "The image format is illegal and cannot be opened."


def test_declared_type_is_ignored_for_real_images() -> None:
    assert fetch_image(data_url(jpeg_bytes(), "image/png")).mime_type == "image/jpeg"
    assert fetch_image(data_url(png_bytes(), "application/octet-stream")).mime_type == "image/png"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("width", "height"), [(8000, 8000), (100_000, 100_000), (2**31 - 1, 1)])
def test_decompression_bomb_is_refused_from_its_header(width: int, height: int) -> None:
    bomb = bomb_png(width, height)
    assert len(bomb) < 200
    with pytest.raises(ImageSizeInvalid) as err:
        fetch_image(data_url(bomb), max_image_pixels=50_000_000)
    # The pixel-cap refusal (not a decode error from the 64-byte IDAT) shows nothing was decoded.
    assert "must not exceed 50000000" in err.value.message


def test_tiny_images_are_refused_as_dashscope_does() -> None:
    with pytest.raises(ImageSizeInvalid) as err:
        fetch_image(data_url(png_bytes(10, 40)))
    assert err.value.message == (
        PREFIX + "The image length and width do not meet the model restrictions. "
        "[height:40 or width:10 must be larger than 10]"
    )
    assert fetch_image(data_url(png_bytes(11, 11))).width == 11
