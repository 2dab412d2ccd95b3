"""Videos: files made here with PyAV, decoded in memory at the requested fps; frame lists; the caps."""

from __future__ import annotations

import base64
import io
from fractions import Fraction
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from qwen_gateway.engines.base import VideoPart
from qwen_gateway.errors import (
    ImageSizeInvalid,
    InvalidParameter,
    MediaFormatInvalid,
    MediaTooLarge,
    VideoLimitExceeded,
)
from qwen_gateway.media import DecodedVideo, MediaFetcher
from qwen_gateway.settings import MediaSettings
from tests.media_support import MediaServer, png_bytes
from tests.unit.media.test_fetch import LOOPBACK, data_url, run

PREFIX = "<400> InternalError.Algo.InvalidParameter: "


def make_video(
    *,
    frames: int = 20,
    rate: int = 10,
    size: tuple[int, int] = (64, 48),
    fmt: str = "mp4",
    codec: str = "mpeg4",
    start: int = 0,
) -> bytes:
    """A video whose frame ``i`` is a flat gray of level ``10 * i`` (so a sampled frame tells which
    source frame it was); its clock starts at ``start`` frames."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream: Any = container.add_stream(codec, rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, rate)
        for i in range(frames):
            pixels = np.full((size[1], size[0], 3), 10 * i, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = start + i, Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def level(frame_png: bytes) -> int:
    with Image.open(io.BytesIO(frame_png)) as im:
        return round(float(np.asarray(im.convert("L")).mean()))


def video_file(data: bytes, fps: float | None = None, **settings: Any) -> DecodedVideo:
    return run(MediaSettings(**settings), lambda f: f.video_file(data_url(data, "video/mp4"), fps))


@pytest.mark.parametrize(("fps", "count"), [(None, 4), (2.0, 4), (5.0, 10), (10.0, 20), (0.5, 1), (3.0, 6)])
def test_mp4_is_sampled_at_the_requested_fps(fps: float | None, count: int) -> None:
    # 20 frames at 10 fps: a 2.0 s video. One frame every 1/fps s from the start (DashScope's 2 by default).
    video = video_file(make_video(), fps)
    rate = fps or 2.0
    assert (video.fps, video.duration, video.mime_type) == (rate, pytest.approx(2.0), "video/mp4")
    assert len(video.frames) == count
    assert video.timestamps == pytest.approx([k / rate for k in range(count)])
    assert all(f.mime_type == "image/png" and (f.width, f.height) == (64, 48) for f in video.frames)
    # Each sample is the source frame on screen at its time: frame index floor(t * 10).
    expected = [10 * int(k / rate * 10 + 1e-9) for k in range(count)]
    assert [level(f.data) for f in video.frames] == pytest.approx(expected, abs=4)


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
def test_sampling_counts_from_the_first_frame(fmt: str) -> None:
    # The clock starts at 50 s (a clip cut from a long recording); it is still a 2 s video.
    clip = make_video(fmt=fmt, start=500)
    video = run(MediaSettings(max_video_seconds=10), lambda f: f.video_file(data_url(clip), 2.0))
    assert video.duration == pytest.approx(2.0)
    assert [level(f.data) for f in video.frames] == pytest.approx([0, 50, 100, 150], abs=4)


def test_webm_and_mkv_decode_too() -> None:
    webm = make_video(fmt="webm", codec="libvpx", frames=10)
    video = run(MediaSettings(), lambda f: f.video_file(data_url(webm, "video/webm"), 2.0))
    assert (len(video.frames), video.mime_type) == (2, "video/webm")
    mkv = make_video(fmt="matroska", frames=10)
    video = run(MediaSettings(), lambda f: f.video_file(data_url(mkv, "video/mp4"), 2.0))
    assert (len(video.frames), video.mime_type) == (2, "video/x-matroska")


def test_video_from_an_allowed_url(media_server: MediaServer) -> None:
    media_server.files["/clip.mp4"] = ("video/mp4", make_video())
    video = run(MediaSettings(**LOOPBACK), lambda f: f.video_file(media_server.url("/clip.mp4"), 5.0))
    assert len(video.frames) == 10
    part = video.to_part()
    assert isinstance(part, VideoPart) and part.fps == 5.0 and part.mime_type == "image/png"
    assert part.frames == tuple(f.data for f in video.frames)


def test_duration_and_frame_caps() -> None:
    clip = make_video()  # 2.0 s
    with pytest.raises(VideoLimitExceeded) as err:
        video_file(clip, 2.0, max_video_seconds=1.5)
    assert err.value.message == PREFIX + "The video is longer than 1.5 seconds."
    with pytest.raises(VideoLimitExceeded) as err:
        video_file(clip, 2.0, max_video_frames=3)
    assert err.value.message == PREFIX + "The video sampled at the requested fps has more than 3 frames."
    assert len(video_file(clip, 2.0, max_video_frames=4).frames) == 4
    with pytest.raises(ImageSizeInvalid):
        video_file(clip, 2.0, max_image_pixels=64 * 48 - 1)


@pytest.mark.parametrize(
    "data",
    [
        png_bytes(),  # an image is not a video
        b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n",  # a playlist
        b"ffconcat version 1.0\nfile /etc/passwd\n",
        b"\x00\x00\x00\x18ftypisom" + b"\x00" * 200,  # an MP4 signature over nothing
    ],
)
def test_bytes_that_are_not_a_video_are_refused(data: bytes) -> None:
    with pytest.raises(MediaFormatInvalid) as err:
        video_file(data)
    assert err.value.message == PREFIX + "The video format is illegal and cannot be opened."


@pytest.mark.parametrize("fps", [0.0, 0.05, 10.5, float("nan"), -1.0])
def test_fps_outside_dashscopes_range_is_refused(fps: float) -> None:
    with pytest.raises(InvalidParameter) as err:
        video_file(make_video(frames=4), fps)
    assert err.value.param == "fps"


def test_frame_list_video(media_server: MediaServer) -> None:
    urls = [media_server.url("/img.png"), data_url(png_bytes(color="green"))] * 2

    async def frames(f: MediaFetcher) -> DecodedVideo:
        return await f.video_frames(urls, 4.0)

    video = run(MediaSettings(**LOOPBACK), frames)
    assert (len(video.frames), video.fps, video.duration, video.mime_type) == (4, 4.0, 1.0, None)
    assert video.timestamps == (0.0, 0.25, 0.5, 0.75)
    assert video.frames[0].data == png_bytes() and video.frames[1].data == png_bytes(color="green")
    with pytest.raises(VideoLimitExceeded) as err:
        run(MediaSettings(**LOOPBACK), lambda f: f.video_frames(urls[:3]))
    assert err.value.message == PREFIX + "The range of sequence images shoule be (4, 512)."
    # One bad frame refuses the whole video.
    with pytest.raises(MediaFormatInvalid):
        run(MediaSettings(**LOOPBACK), lambda f: f.video_frames([*urls, media_server.url("/text.png")]))


def test_a_frame_list_has_the_video_byte_cap_in_all(media_server: MediaServer) -> None:
    frame = len(media_server.files["/big.png"][1])  # a PNG padded to about 200 kB
    urls = [media_server.url("/big.png")] * 5
    settings = MediaSettings(max_video_bytes=4 * frame + 10, **LOOPBACK)
    with pytest.raises(MediaTooLarge):
        run(settings, lambda f: f.video_frames(urls))
    assert len(run(settings, lambda f: f.video_frames(urls[:4])).frames) == 4


def test_a_data_url_video_has_the_data_uri_cap() -> None:
    settings = MediaSettings(max_data_uri_bytes=2048)
    url = "data:video/mp4;base64," + base64.b64encode(make_video()).decode()
    assert len(make_video()) > 2048
    with pytest.raises(MediaTooLarge) as err:
        run(settings, lambda f: f.video_file(url))
    assert err.value.message == "Exceeded limit on max bytes per data-uri item : 2048"
