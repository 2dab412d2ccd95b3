"""Qwen-VL inputs built without transformers' AutoProcessor (which needs torchvision, and PyPI's
torchvision does not load beside this machine's torch build).

What the checkpoint's own processor does, step by step, and what we do instead:

- images: RGB (transparency composited onto white), resized with PIL bicubic to the size
  :func:`qwen_gateway.media.tokens.smart_resize` gives, rescaled by 1/255 (in float64, then float32),
  normalized by the processor config's mean/std, and cut into flattened patches in the order the
  vision tower expects (merge windows outermost, then channel, a temporal copy, and the patch pixels);
- videos: every frame resized alike, frames padded to a multiple of ``temporal_patch_size`` by repeating
  the last, and each temporal group cut the same way;
- the prompt: the chat template renders one ``<|image_pad|>`` / ``<|video_pad|>`` per part; each is
  replaced *in the text* by the expansion the processor writes (pads; for Qwen3-VL videos a timestamp
  and a start/pad/end block per temporal group) and the text is tokenized once, as the processor does.

``tests/unit/engines/test_local_vision.py`` checks the result against the checkpoint's real
processor classes. The counts come from :mod:`qwen_gateway.media.tokens`, the same functions that
price the request.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from qwen_gateway.engines.base import GenerationRequest, ImagePart, VideoPart
from qwen_gateway.errors import InvalidParameter
from qwen_gateway.media.tokens import (
    ImageLayout,
    MediaGeometryError,
    VideoLayout,
    VisionGeometry,
    image_bounds,
    image_layout,
    video_layout,
)

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
# The CLIP statistics Qwen2/2.5-VL processors default to when their config names none.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# mm_token_type_ids values the models' get_rope_index reads.
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2
# Model types whose processor writes per-group timestamps into video prompts.
TIMESTAMP_FAMILIES = frozenset({"qwen3_vl", "qwen3_vl_moe"})
SECONDS_PER_GRID_FAMILIES = frozenset({"qwen2_5_vl"})


@dataclass(frozen=True, slots=True)
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class VisionSpec:
    """What a VL checkpoint takes, read from its config and processor configs."""

    model_type: str
    image: VisionGeometry
    image_norm: Normalization
    video: VisionGeometry | None  # None: the checkpoint takes no video
    video_norm: Normalization
    image_token_id: int
    video_token_id: int | None

    @classmethod
    def from_checkpoint(cls, directory: Path | None, config: Any) -> VisionSpec | None:
        """None for a text-only checkpoint (no ``vision_config``)."""
        vision = getattr(config, "vision_config", None)
        image_token_id = getattr(config, "image_token_id", None)
        if vision is None or not isinstance(image_token_id, int):
            return None
        model_type = str(getattr(config, "model_type", ""))
        image_cfg = _json(directory / "preprocessor_config.json") if directory else {}
        video_cfg = _json(directory / "video_preprocessor_config.json") if directory else {}
        patch = int(image_cfg.get("patch_size") or getattr(vision, "patch_size", None) or 14)
        merge = int(image_cfg.get("merge_size") or getattr(vision, "spatial_merge_size", None) or 2)
        temporal = int(
            image_cfg.get("temporal_patch_size") or getattr(vision, "temporal_patch_size", None) or 2
        )
        image = VisionGeometry(patch, merge, temporal)
        video_token_id = getattr(config, "video_token_id", None)
        video = None
        if isinstance(video_token_id, int):
            video = VisionGeometry(
                int(video_cfg.get("patch_size") or patch),
                int(video_cfg.get("merge_size") or merge),
                int(video_cfg.get("temporal_patch_size") or temporal),
                video_timestamps=model_type in TIMESTAMP_FAMILIES,
            )
        image_norm = _normalization(image_cfg)
        return cls(
            model_type=model_type,
            image=image,
            image_norm=image_norm,
            video=video,
            video_norm=_normalization(video_cfg) if video_cfg else image_norm,
            image_token_id=image_token_id,
            video_token_id=video_token_id if isinstance(video_token_id, int) else None,
        )


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _triple(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if isinstance(value, list | tuple) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    return default


def _normalization(cfg: dict[str, Any]) -> Normalization:
    return Normalization(_triple(cfg.get("image_mean"), CLIP_MEAN), _triple(cfg.get("image_std"), CLIP_STD))


# -- pixels ---------------------------------------------------------------------------------------------


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded image bytes -> an RGB image, transparency composited onto white (as the processors do)."""
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.copy() if opened.mode == "RGB" else opened.convert("RGBA")
    if image.mode == "RGB":
        return image
    if "A" in image.getbands():
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def normalized(image: Image.Image, height: int, width: int, norm: Normalization) -> np.ndarray:
    """``image`` resized (bicubic) to ``height × width``, as float32 ``[3, H, W]`` rescaled and
    normalized with the same float operations as the processors' PIL path."""
    resized = (
        image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BICUBIC)
    )
    array = np.moveaxis(np.asarray(resized, dtype=np.uint8), -1, 0)
    scaled = (array.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(norm.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(norm.std, dtype=np.float32).reshape(3, 1, 1)
    out: np.ndarray = (scaled - mean) / std
    return out


def patches(frames: np.ndarray, geometry: VisionGeometry) -> np.ndarray:
    """``[T, 3, H, W]`` frames (T a multiple of the temporal patch) -> ``[groups·h·w, 3·t·p·p]`` rows,
    ordered group, merge window (row, column), position inside the window, as the vision tower reads
    them."""
    t, c, height, width = frames.shape
    p, m, tp = geometry.patch_size, geometry.merge_size, geometry.temporal_patch_size
    gh, gw = height // p, width // p
    grid = frames.reshape(t // tp, tp, c, gh // m, m, p, gw // m, m, p)
    # -> groups, window row, window column, row in window, column in window, channel, time, py, px
    grid = grid.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    out: np.ndarray = np.ascontiguousarray(grid).reshape((t // tp) * gh * gw, c * tp * p * p)
    return out


def image_patches(image: Image.Image, layout: ImageLayout, spec: VisionSpec) -> np.ndarray:
    frame = normalized(image, layout.height, layout.width, spec.image_norm)
    # An image is one temporal group of identical copies.
    stacked = np.broadcast_to(frame, (spec.image.temporal_patch_size, *frame.shape))
    return patches(np.ascontiguousarray(stacked), spec.image)


def video_patches(
    frames: list[Image.Image], layout: VideoLayout, geometry: VisionGeometry, spec: VisionSpec
) -> np.ndarray:
    arrays = [normalized(f, layout.height, layout.width, spec.video_norm) for f in frames]
    while len(arrays) % geometry.temporal_patch_size:
        arrays.append(arrays[-1])
    return patches(np.stack(arrays), geometry)


# -- one request -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class VisionRow:
    """One request's media as the model takes it, plus its 3-D rope positions.

    ``features`` is filled on the inference thread at the row's first prefill chunk holding pads:
    per modality, the vision tower's output rows in pad order (and DeepStack's per-layer rows)."""

    positions: torch.Tensor  # [3, prompt tokens]
    rope_delta: int
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    pixel_values_videos: torch.Tensor | None
    video_grid_thw: torch.Tensor | None
    image_token_id: int
    video_token_id: int | None
    features: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VisionPrompt:
    ids: list[int]
    row: VisionRow
    image_tokens: int
    video_tokens: int


def has_media(request: GenerationRequest) -> bool:
    return any(
        isinstance(part, ImagePart | VideoPart)
        for message in request.messages
        if not isinstance(message.content, str)
        for part in message.content
    )


def media_parts(request: GenerationRequest) -> list[ImagePart | VideoPart]:
    return [
        part
        for message in request.messages
        if not isinstance(message.content, str)
        for part in message.content
        if isinstance(part, ImagePart | VideoPart)
    ]


class VisionBuilder:
    """Builds the prompt ids and :class:`VisionRow` of a request with images or video.

    ``encode`` tokenizes text (thread-safe, the renderer's); ``rope_index`` is the model's own
    ``get_rope_index`` (integer maths over the grids, no weights)."""

    def __init__(
        self, spec: VisionSpec, encode: Callable[[str], list[int]], rope_index: Callable[..., Any]
    ) -> None:
        self.spec = spec
        self._encode = encode
        self._rope_index = rope_index

    def build(self, request: GenerationRequest, text: str) -> VisionPrompt:
        """``text`` is the chat template's rendering (one pad per part, in order)."""
        spec = self.spec
        parts = media_parts(request)
        images = [p for p in parts if isinstance(p, ImagePart)]
        videos = [p for p in parts if isinstance(p, VideoPart)]
        if text.count(IMAGE_PAD) != len(images) or text.count(VIDEO_PAD) != len(videos):
            # Only a message's own text can add a pad: refuse it rather than misplace the media.
            raise InvalidParameter(
                "The messages contain vision placeholder tokens of their own.", param="messages"
            )
        if videos and spec.video is None:
            raise InvalidParameter("This model does not support video input.", param="messages")
        image_rows: list[np.ndarray] = []
        image_grids: list[list[int]] = []
        replacements: dict[str, list[str]] = {IMAGE_PAD: [], VIDEO_PAD: []}
        image_tokens = 0
        for image in images:
            picture = _decode(image.data)
            layout = self._image_layout(request, image, picture)
            image_rows.append(image_patches(picture, layout, spec))
            image_grids.append([1, layout.grid_h, layout.grid_w])
            replacements[IMAGE_PAD].append(IMAGE_PAD * layout.pads)
            image_tokens += layout.tokens
        video_rows: list[np.ndarray] = []
        video_grids: list[list[int]] = []
        seconds_per_grid: list[float] = []
        video_tokens = 0
        for video in videos:
            geometry = spec.video
            assert geometry is not None
            frames = [_decode(f) for f in video.frames]
            if not frames:
                raise InvalidParameter("A video has no frames.", param="messages")
            try:
                vlayout = video_layout(
                    len(frames),
                    frames[0].height,
                    frames[0].width,
                    geometry,
                    fps=video.fps,
                    count_text=lambda s: len(self._encode(s)),
                )
            except MediaGeometryError as exc:
                raise InvalidParameter(str(exc), param="messages") from None
            video_rows.append(video_patches(frames, vlayout, geometry, spec))
            video_grids.append([vlayout.grid_t, vlayout.grid_h, vlayout.grid_w])
            seconds_per_grid.append(geometry.temporal_patch_size / vlayout.fps)
            replacements[VIDEO_PAD].append(_video_text(vlayout))
            video_tokens += vlayout.tokens
        expanded = _replace_in_order(text, replacements)
        ids = self._encode(expanded)
        row = self._row(ids, image_rows, image_grids, video_rows, video_grids, seconds_per_grid)
        return VisionPrompt(ids, row, image_tokens, video_tokens)

    def _image_layout(self, request: GenerationRequest, part: ImagePart, picture: Image.Image) -> ImageLayout:
        bounds = image_bounds(
            self.spec.image,
            high_resolution=request.media.high_resolution,
            min_pixels=part.min_pixels,
            max_pixels=part.max_pixels,
            ocr=request.media.ocr,
        )
        try:
            return image_layout(picture.height, picture.width, self.spec.image, bounds)
        except MediaGeometryError as exc:
            raise InvalidParameter(str(exc), param="messages") from None

    def _row(
        self,
        ids: list[int],
        image_rows: list[np.ndarray],
        image_grids: list[list[int]],
        video_rows: list[np.ndarray],
        video_grids: list[list[int]],
        seconds_per_grid: list[float],
    ) -> VisionRow:
        spec = self.spec
        input_ids = torch.tensor([ids], dtype=torch.long)
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == spec.image_token_id] = IMAGE_TYPE
        if spec.video_token_id is not None:
            types[input_ids == spec.video_token_id] = VIDEO_TYPE
        image_grid = torch.tensor(image_grids, dtype=torch.long) if image_grids else None
        video_grid = torch.tensor(video_grids, dtype=torch.long) if video_grids else None
        kwargs: dict[str, Any] = {}
        if spec.model_type in SECONDS_PER_GRID_FAMILIES and video_grid is not None:
            kwargs["second_per_grid_ts"] = torch.tensor(seconds_per_grid)
        positions, deltas = self._rope_index(
            input_ids,
            mm_token_type_ids=types,
            image_grid_thw=image_grid,
            video_grid_thw=None if video_grid is None else video_grid.clone(),
            **kwargs,
        )
        return VisionRow(
            positions=positions[:, 0].to(torch.long).contiguous(),
            rope_delta=int(deltas.reshape(-1)[0]),
            pixel_values=torch.from_numpy(np.concatenate(image_rows)) if image_rows else None,
            image_grid_thw=image_grid,
            pixel_values_videos=torch.from_numpy(np.concatenate(video_rows)) if video_rows else None,
            video_grid_thw=video_grid,
            image_token_id=spec.image_token_id,
            video_token_id=spec.video_token_id,
        )


def _decode(data: bytes) -> Image.Image:
    try:
        return decode_rgb(data)
    except Exception:  # a decoder's own text never reaches the client
        raise InvalidParameter("An image could not be decoded.", param="messages") from None


def _video_text(layout: VideoLayout) -> str:
    if not layout.timestamps:
        return VIDEO_PAD * layout.pads
    block = VISION_START + VIDEO_PAD * layout.pads_per_group + VISION_END
    return "".join(stamp + block for stamp in layout.timestamps)


def _replace_in_order(text: str, replacements: dict[str, list[str]]) -> str:
    """Replace the i-th occurrence of each pad token by its i-th replacement, left to right."""
    out: list[str] = []
    iters = {token: iter(values) for token, values in replacements.items()}
    pos = 0
    while True:
        hits = [(text.find(token, pos), token) for token in iters]
        hits = [(i, t) for i, t in hits if i >= 0]
        if not hits:
            out.append(text[pos:])
            return "".join(out)
        index, token = min(hits)
        out.append(text[pos:index])
        out.append(next(iters[token]))
        pos = index + len(token)
