"""Video files decoded in memory with PyAV and sampled at a frame rate; the caps are checked on the
container's header before decoding and again on what decoding produces."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from qwen_gateway.engines.base import VideoPart
from qwen_gateway.errors import (
    ImageSizeInvalid,
    InvalidParameter,
    MediaError,
    MediaFormatInvalid,
    VideoLimitExceeded,
)
from qwen_gateway.media.image import FetchedImage
from qwen_gateway.media.sniff import VIDEO_DEMUXERS, sniff_video
from qwen_gateway.settings import MediaSettings

# DashScope's fps for video input when a request gives none, and the range it accepts (reference §3.2).
DEFAULT_FPS = 2.0
FPS_RANGE = (0.1, 10.0)
# Fastest source frame rate we decode through: bounds the work of a file whose timestamps lie.
_MAX_SOURCE_FPS = 240
# Frames are re-encoded losslessly; level 1 because the engine decodes them again right away.
_PNG_LEVEL = 1


@dataclass(frozen=True, slots=True)
class DecodedVideo:
    """A video as the engine takes it: still images in order, sampled at ``fps``.

    For a video file, ``frames`` are PNG images decoded from it, one every ``1/fps`` seconds from the
    start (``timestamps``: when each was shown), ``duration`` the file's length in seconds and
    ``mime_type`` the container sniffed from its bytes. For a frame list, ``frames`` are the fetched
    images as given, ``timestamps`` are ``i/fps``, ``duration`` is ``len(frames)/fps`` and ``mime_type``
    is None."""

    frames: tuple[FetchedImage, ...]
    fps: float
    timestamps: tuple[float, ...]
    duration: float
    mime_type: str | None

    def to_part(self) -> VideoPart:
        """The engine's part for this video (frame bytes in order; ``mime_type`` is the frames' type when
        they all share one, else ``image/*``)."""
        types = {f.mime_type for f in self.frames}
        mime = types.pop() if len(types) == 1 else "image/*"
        return VideoPart(frames=tuple(f.data for f in self.frames), mime_type=mime, fps=self.fps)


def check_fps(fps: float | None) -> float:
    """``fps`` as requested, DashScope's default when absent; outside DashScope's range is a 400."""
    if fps is None:
        return DEFAULT_FPS
    low, high = FPS_RANGE
    if not (math.isfinite(fps) and low <= fps <= high):
        raise InvalidParameter(f"The fps parameter must be in [{low:g}, {high:g}].", param="fps")
    return float(fps)


def _refuse_io(url: str, flags: int, options: dict[str, Any]) -> Any:
    # A container that asks to open another file or URL (references, playlists) is refused: the video
    # is the bytes we were given, nothing else.
    raise OSError("external resources are not allowed")


def decode_video(data: bytes, *, fps: float, settings: MediaSettings) -> DecodedVideo:
    """Decode ``data`` (a whole video file) and sample it at ``fps``. Blocking: run it off the loop."""
    import av  # here, not at module level: the server stack imports without PyAV until a video arrives

    mime = sniff_video(data)
    if mime is None:
        raise MediaFormatInvalid("video")
    try:
        with av.open(
            io.BytesIO(data), mode="r", format=VIDEO_DEMUXERS[mime].split(",")[0], io_open=_refuse_io
        ) as container:
            if not container.streams.video:
                raise MediaFormatInvalid("video")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > settings.max_image_pixels:
                raise ImageSizeInvalid.too_many_pixels(settings.max_image_pixels)
            # The header's length, to refuse a long video before decoding it. Only a pre-check: some
            # containers count their start offset in it (Matroska), so the sampling below measures
            # the length from the decoded frames themselves.
            declared = _declared_duration(container, stream)
            if declared is not None:
                _check_duration(declared, settings)
                if _sample_count(declared, fps) > settings.max_video_frames:
                    raise VideoLimitExceeded.sampled_frames(settings.max_video_frames)
            rate = float(stream.average_rate) if stream.average_rate else None
            frames, times, duration = _sample(container.decode(stream), fps, rate, settings)
    except MediaError:
        raise
    except Exception:
        # PyAV raises its own error tree (and OSError/ValueError) for a broken file; the client gets one
        # fixed message, never FFmpeg's text.
        raise MediaFormatInvalid("video") from None
    if not frames:
        raise MediaFormatInvalid("video")
    return DecodedVideo(
        frames=tuple(frames), fps=fps, timestamps=tuple(times), duration=duration, mime_type=mime
    )


def _declared_duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        # In AV_TIME_BASE units. Where it includes the start offset, take that off: an underestimate
        # here is safe (decoding checks every frame's time against the cap), an overestimate is not.
        start = container.start_time if container.start_time and container.start_time > 0 else 0
        length = container.duration - start
        return float(length if length > 0 else container.duration) / 1_000_000
    return None


def _check_duration(seconds: float, settings: MediaSettings) -> None:
    if seconds > settings.max_video_seconds + 1e-6:
        raise VideoLimitExceeded.duration(settings.max_video_seconds)


def _sample_count(duration: float, fps: float) -> int:
    # One frame at t = k/fps for every k with t inside the video (a small tolerance so 2.0 s at 2 fps
    # is 4 frames, not 5).
    return max(1, math.ceil(duration * fps - 1e-6))


def _sample(
    decoded: Iterator[Any], fps: float, source_rate: float | None, settings: MediaSettings
) -> tuple[list[FetchedImage], list[float], float]:
    """The frame on screen at each sampling time ``k/fps`` (times from the first frame), with those
    times and the video's measured length (last frame's time plus its display time)."""
    picked: list[FetchedImage] = []
    times: list[float] = []
    last: Any = None
    last_t = 0.0
    step: float | None = None
    origin: float | None = None
    budget = int(settings.max_video_seconds * _MAX_SOURCE_FPS) + 1

    def take(frame: Any) -> None:
        if len(picked) >= settings.max_video_frames:
            raise VideoLimitExceeded.sampled_frames(settings.max_video_frames)
        if frame.width * frame.height > settings.max_image_pixels:  # a size change mid-stream
            raise ImageSizeInvalid.too_many_pixels(settings.max_image_pixels)
        times.append(len(picked) / fps)
        picked.append(_encode(frame.to_image()))

    for count, frame in enumerate(decoded):
        if count >= budget:
            raise VideoLimitExceeded.duration(settings.max_video_seconds)
        # Times count from the first frame: containers may start their clock anywhere (edit lists,
        # streams cut from a longer recording).
        absolute = float(frame.time) if frame.time is not None else count / (source_rate or fps)
        origin = absolute if origin is None else origin
        t = absolute - origin
        _check_duration(t, settings)
        # Every sampling time before this frame's start shows the previous frame (or this one, if it
        # is the first).
        while len(picked) / fps < t - 1e-6:
            take(last if last is not None else frame)
        if last is not None and t > last_t:
            step = t - last_t
        last, last_t = frame, t
    if last is None:
        return [], [], 0.0
    shown_for = step if step is not None else 1 / (source_rate or fps)
    duration = last_t + shown_for
    _check_duration(duration, settings)
    while len(picked) < _sample_count(duration, fps):
        take(last)
    return picked, times, duration


def _encode(image: Image.Image) -> FetchedImage:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=_PNG_LEVEL)
    return FetchedImage(data=out.getvalue(), mime_type="image/png", width=image.width, height=image.height)
