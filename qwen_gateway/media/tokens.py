"""Image and video token maths, as DashScope bills Qwen-VL (reference §4.4) and as the Qwen-VL
processors lay media out in the prompt. Pure integer arithmetic: no torch, no image decoding.

One image becomes a grid of ``patch_size``-pixel patches; every ``merge_size × merge_size`` patches are
merged into one LLM token, so one token covers a ``factor × factor`` block (``factor = patch_size ×
merge_size``: 28 px for Qwen2/2.5-VL and QVQ, 32 px for Qwen3-VL). The image is first resized so both
sides are multiples of ``factor`` and its area lies within ``[min_pixels, max_pixels]``; the token count
is then ``h/factor × w/factor`` pads plus the vision start/end tokens around them.

A video is a run of frames resized alike; every ``temporal_patch_size`` consecutive frames (2) form one
temporal group (a short last group repeats its last frame). Qwen2/2.5-VL lay a video out as one
``<|vision_start|>pads<|vision_end|>`` block; Qwen3-VL writes each temporal group as its own block
preceded by a timestamp text such as ``<0.5 seconds>`` (the mean time of the group's frames), all
inside the chat template's own start/end pair.

This module is the one place these counts come from: the local engine builds its input from
:func:`image_layout` / :func:`video_layout`, and the billed ``image_tokens``/``video_tokens`` are
:attr:`ImageLayout.tokens` / :attr:`VideoLayout.tokens` of those same layouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# DashScope's per-image bounds, in tokens (reference §4.4): at least 4, at most 1280 by default and
# 16384 with ``vl_high_resolution_images``.
MIN_IMAGE_TOKENS = 4
MAX_IMAGE_TOKENS = 1280
MAX_IMAGE_TOKENS_HIGH_RES = 16384
# Per-frame bounds of video frames (qwen-vl-utils' VIDEO_MIN/MAX_PIXELS, in tokens): 4 frames of a
# 3840×2160 list cost 1440 video tokens on qwen-vl-max (raw:multimodal-generation-vl-video-nosse) =
# 2 groups × 20×36 blocks, which is exactly a 768-token frame cap.
MIN_FRAME_TOKENS = 4
MAX_FRAME_TOKENS = 768
# Qwen-VL-OCR's own defaults (reference §4.4: qwen-vl-ocr-2025-11-20 uses min 3072 = 32·32·3 and
# max 8,388,608 = 32·32·8192 pixels). For a 28 px checkpoint the same counts of blocks apply.
OCR_MIN_BLOCKS = 3
OCR_MAX_BLOCKS = 8192
# The vision start and end tokens around every block of pads.
FRAME_TOKENS = 2
# The processors refuse images more than this elongated.
MAX_ASPECT_RATIO = 200
# DashScope's default sampling rate of a video file, and the rate assumed for a frame list without fps.
DEFAULT_FPS = 2.0


class MediaGeometryError(ValueError):
    """An image or video the model cannot take (too small, too elongated); the text says why."""


@dataclass(frozen=True, slots=True)
class VisionGeometry:
    """How a checkpoint cuts media into tokens (from its processor config)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    # Qwen3-VL: per-temporal-group timestamps and blocks in video prompts.
    video_timestamps: bool = False

    @property
    def factor(self) -> int:
        """Pixels along one side of the block one LLM token covers."""
        return self.patch_size * self.merge_size


@dataclass(frozen=True, slots=True)
class PixelBounds:
    """The area an image (or one video frame) is resized into."""

    min_pixels: int
    max_pixels: int


def image_bounds(
    geometry: VisionGeometry,
    *,
    high_resolution: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    ocr: bool = False,
) -> PixelBounds:
    """DashScope's bounds for one image: 4..1280 tokens' worth of pixels (16384 with
    ``vl_high_resolution_images``; OCR models their own defaults), narrowed by the request's own
    ``min_pixels``/``max_pixels``, which may move within those bounds but never past them."""
    block = geometry.factor**2
    if ocr:
        low, high = OCR_MIN_BLOCKS * block, OCR_MAX_BLOCKS * block
    else:
        cap = MAX_IMAGE_TOKENS_HIGH_RES if high_resolution else MAX_IMAGE_TOKENS
        low, high = MIN_IMAGE_TOKENS * block, cap * block
    floor, ceiling = low, high
    if min_pixels is not None:
        low = min(max(min_pixels, floor), ceiling)
    if max_pixels is not None:
        high = min(max(max_pixels, floor), ceiling)
    return PixelBounds(low, max(low, high))


def frame_bounds(geometry: VisionGeometry) -> PixelBounds:
    block = geometry.factor**2
    return PixelBounds(MIN_FRAME_TOKENS * block, MAX_FRAME_TOKENS * block)


def smart_resize(height: int, width: int, factor: int, bounds: PixelBounds) -> tuple[int, int]:
    """The size an image is resized to: sides multiples of ``factor``, aspect ratio kept as well as
    the rounding allows, area within ``bounds`` (scaled down and floored when above, up and ceiled
    when below)."""
    if height <= 0 or width <= 0:
        raise MediaGeometryError("The image has no pixels.")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaGeometryError(
            f"The image's aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {height}x{width}."
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > bounds.max_pixels:
        scale = math.sqrt(height * width / bounds.max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < bounds.min_pixels:
        scale = math.sqrt(bounds.min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


@dataclass(frozen=True, slots=True)
class ImageLayout:
    """An image's resized size and its patch grid (``grid_t`` is 1 for an image)."""

    height: int
    width: int
    grid_h: int  # patches, before merging
    grid_w: int
    merge_size: int

    @property
    def pads(self) -> int:
        return self.grid_h * self.grid_w // self.merge_size**2

    @property
    def tokens(self) -> int:
        """Prompt tokens the image takes: its pads and the vision start/end tokens."""
        return self.pads + FRAME_TOKENS


def image_layout(height: int, width: int, geometry: VisionGeometry, bounds: PixelBounds) -> ImageLayout:
    h, w = smart_resize(height, width, geometry.factor, bounds)
    return ImageLayout(h, w, h // geometry.patch_size, w // geometry.patch_size, geometry.merge_size)


def image_tokens(height: int, width: int, geometry: VisionGeometry, bounds: PixelBounds) -> int:
    """DashScope's formula: ``h_bar × w_bar / factor² + 2``."""
    return image_layout(height, width, geometry, bounds).tokens


@dataclass(frozen=True, slots=True)
class VideoLayout:
    """A video's frames after resizing and grouping, and the text its prompt block holds."""

    frames: int  # frames given (before padding the last temporal group)
    height: int
    width: int
    grid_t: int  # temporal groups
    grid_h: int
    grid_w: int
    merge_size: int
    fps: float
    # Qwen3-VL: the timestamp text before each temporal group's block, and its token count.
    timestamps: tuple[str, ...] = ()
    timestamp_tokens: int = 0

    @property
    def pads_per_group(self) -> int:
        return self.grid_h * self.grid_w // self.merge_size**2

    @property
    def pads(self) -> int:
        return self.grid_t * self.pads_per_group

    @property
    def tokens(self) -> int:
        """Prompt tokens the video takes: pads, the chat template's start/end pair around the video,
        and for Qwen3-VL each group's own start/end pair and timestamp (its processor replaces the
        template's one pad by the groups, so the template's pair stays around them)."""
        inner = FRAME_TOKENS * self.grid_t if self.timestamps else 0
        return self.pads + FRAME_TOKENS + inner + self.timestamp_tokens


def group_timestamps(frames: int, fps: float, temporal_patch_size: int) -> tuple[str, ...]:
    """Qwen3-VL's timestamp text per temporal group: the mean time (frame index / fps) of the group's
    first and last frame, the short last group padded with its last frame, one decimal."""
    indices = list(range(frames))
    while len(indices) % temporal_patch_size:
        indices.append(indices[-1])
    times = [i / fps for i in indices]
    return tuple(
        f"<{(times[i] + times[i + temporal_patch_size - 1]) / 2:.1f} seconds>"
        for i in range(0, len(times), temporal_patch_size)
    )


def video_layout(
    frames: int,
    height: int,
    width: int,
    geometry: VisionGeometry,
    *,
    fps: float | None = None,
    count_text: Callable[[str], int] | None = None,
    bounds: PixelBounds | None = None,
) -> VideoLayout:
    """The layout of ``frames`` frames of ``height × width`` (every frame is resized to the first's
    size). ``count_text`` counts a timestamp's tokens (required for Qwen3-VL geometries)."""
    if frames < 1:
        raise MediaGeometryError("The video has no frames.")
    rate = fps if fps is not None else DEFAULT_FPS
    h, w = smart_resize(height, width, geometry.factor, bounds or frame_bounds(geometry))
    grid_t = -(-frames // geometry.temporal_patch_size)
    stamps: tuple[str, ...] = ()
    stamp_tokens = 0
    if geometry.video_timestamps:
        if count_text is None:
            raise ValueError("count_text is required for a geometry with video timestamps")
        stamps = group_timestamps(frames, rate, geometry.temporal_patch_size)
        stamp_tokens = sum(count_text(s) for s in stamps)
    return VideoLayout(
        frames=frames,
        height=h,
        width=w,
        grid_t=grid_t,
        grid_h=h // geometry.patch_size,
        grid_w=w // geometry.patch_size,
        merge_size=geometry.merge_size,
        fps=rate,
        timestamps=stamps,
        timestamp_tokens=stamp_tokens,
    )
