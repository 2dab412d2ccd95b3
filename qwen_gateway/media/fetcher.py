"""The media fetcher: URLs in, checked images and sampled videos out."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from qwen_gateway.errors import MediaTooLarge, VideoLimitExceeded
from qwen_gateway.media.fetch import Downloader, decode_data_url
from qwen_gateway.media.image import FetchedImage, check_image
from qwen_gateway.media.video import DecodedVideo, check_fps, decode_video
from qwen_gateway.settings import MediaSettings

T = TypeVar("T")
P = ParamSpec("P")


class MediaFetcher:
    """Resolves a request's media: one per app, built from ``settings.media``; call :meth:`aclose`
    when the app stops. All methods are safe to run concurrently (see :func:`gather`)."""

    def __init__(self, settings: MediaSettings) -> None:
        self.settings = settings
        self._downloader = Downloader(settings)
        # Decoding is CPU work in Pillow/FFmpeg (both release the GIL): a small pool of its own keeps it
        # off the event loop and keeps many concurrent media requests from taking every core.
        self._pool = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="media")
        self._slots = asyncio.Semaphore(settings.max_parallel_downloads)

    async def image(self, url: str) -> FetchedImage:
        """The image at ``url`` (``http(s)://`` or a base64 ``data:`` URL), checked: its bytes are one of
        JPEG/PNG/WEBP/GIF/BMP/TIFF whatever the declared type, each side is over 10 px, the header
        declares at most ``max_image_pixels`` and it decodes whole."""
        return await self._image(url, None)

    async def _image(self, url: str, total: list[int] | None) -> FetchedImage:
        data = await self._bytes(url, max_bytes=self.settings.max_image_bytes, kind="image")
        if total is not None:
            # One frame list holds at most max_video_bytes in all, as one video file does (512 frames
            # of 10 MB each would otherwise be 5 GB held for one request).
            total[0] += len(data)
            if total[0] > self.settings.max_video_bytes:
                raise MediaTooLarge(self.settings.max_video_bytes, data_uri=False)
        return await self._run(check_image, data, max_pixels=self.settings.max_image_pixels)

    async def video_frames(self, urls: Sequence[str], fps: float | None = None) -> DecodedVideo:
        """A video given as a list of frame images (each checked as :meth:`image`), fetched
        concurrently; the count must be within ``[min_video_frames, max_video_frames]`` (checked before
        anything is fetched) and all frames together within ``max_video_bytes``. ``fps`` is the rate the
        frames were taken at (DashScope's default 2)."""
        rate = check_fps(fps)
        low, high = self.settings.min_video_frames, self.settings.max_video_frames
        if not low <= len(urls) <= high:
            raise VideoLimitExceeded.frame_count(low, high)
        total = [0]
        frames = await gather(*(self._image(u, total) for u in urls))
        return DecodedVideo(
            frames=tuple(frames),
            fps=rate,
            timestamps=tuple(i / rate for i in range(len(frames))),
            duration=len(frames) / rate,
            mime_type=None,
        )

    async def video_file(self, url: str, fps: float | None = None) -> DecodedVideo:
        """The video file at ``url`` (``http(s)://`` or ``data:``) decoded in memory and sampled at
        ``fps`` (DashScope's default 2 when None): one PNG frame every ``1/fps`` s from the start. The
        container must be MP4/MOV/WEBM/MKV/AVI by its bytes; duration (``max_video_seconds``), sampled
        frames (``max_video_frames``) and frame size (``max_image_pixels``) are capped."""
        rate = check_fps(fps)
        data = await self._bytes(url, max_bytes=self.settings.max_video_bytes, kind="video")
        return await self._run(decode_video, data, fps=rate, settings=self.settings)

    async def aclose(self) -> None:
        """Stop the decoding threads (a decode already running finishes on its own)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _bytes(self, url: str, *, max_bytes: int, kind: str) -> bytes:
        if url[:5].lower() == "data:":
            # Off the loop too: base64 over megabytes would stall every other request for milliseconds.
            return await self._run(
                decode_data_url, url, max_bytes=self.settings.max_data_uri_bytes, kind=kind
            )
        async with self._slots:
            return await self._downloader.get(url, max_bytes=max_bytes)

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))


async def gather(*aws: Awaitable[T]) -> list[T]:
    """Run ``aws`` concurrently and return their results in order. On the first failure the others are
    cancelled (and awaited) and that first exception is raised as it is, not wrapped in an
    ``ExceptionGroup`` as ``TaskGroup`` would, so an ``ApiError`` reaches the error renderer."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
