"""A request's image and video parts: what validation found (URLs, still unfetched), and resolving
them into the engine's parts through the media fetcher (``qwen_gateway/media``).

Validation is synchronous and never touches the network, so it leaves a :class:`MediaRef` where each
media part was and keeps the request's engine messages with an empty text in that slot. The route
then awaits :func:`resolve`, which fetches every part of the request concurrently (a failure is the
fetcher's 400, before any generation, so nothing is charged) and puts the fetched parts in place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen_gateway.engines.base import ContentPart, ImagePart, TextPart, VideoPart
from qwen_gateway.errors import ApiError

if TYPE_CHECKING:
    from qwen_gateway.media import MediaFetcher
    from qwen_gateway.service.validation import ChatCall


@dataclass(frozen=True, slots=True)
class ImageRef:
    url: str
    min_pixels: int | None = None
    max_pixels: int | None = None


@dataclass(frozen=True, slots=True)
class VideoFramesRef:
    urls: tuple[str, ...]
    fps: float | None = None


@dataclass(frozen=True, slots=True)
class VideoFileRef:
    url: str
    fps: float | None = None


MediaRef = ImageRef | VideoFramesRef | VideoFileRef
# What a media part's slot holds until resolve() fills it (an engine never gets an unresolved call).
EMPTY_SLOT = TextPart("")


@dataclass(frozen=True, slots=True)
class MediaSlot:
    """Where a media part goes: ``messages[message].content[part]``; ``param`` names it in errors."""

    message: int
    part: int
    ref: MediaRef
    param: str


async def resolve(call: ChatCall, fetcher: MediaFetcher) -> ChatCall:
    """``call`` with its media fetched and in place (unchanged when it has none)."""
    if not call.media:
        return call
    from qwen_gateway.media import gather

    parts = await gather(*(_fetch(slot, fetcher) for slot in call.media))
    messages = list(call.generation.messages)
    contents: dict[int, list[ContentPart]] = {}
    for slot, part in zip(call.media, parts, strict=True):
        content = contents.get(slot.message)
        if content is None:
            current = messages[slot.message].content
            assert not isinstance(current, str)
            content = contents[slot.message] = list(current)
        content[slot.part] = part
    for index, content in contents.items():
        messages[index] = dataclasses.replace(messages[index], content=tuple(content))
    generation = dataclasses.replace(call.generation, messages=tuple(messages))
    return dataclasses.replace(call, generation=generation, media=())


async def _fetch(slot: MediaSlot, fetcher: MediaFetcher) -> ImagePart | VideoPart:
    ref = slot.ref
    try:
        if isinstance(ref, ImageRef):
            image = await fetcher.image(ref.url)
            return image.to_part(min_pixels=ref.min_pixels, max_pixels=ref.max_pixels)
        if isinstance(ref, VideoFramesRef):
            return (await fetcher.video_frames(ref.urls, ref.fps)).to_part()
        return (await fetcher.video_file(ref.url, ref.fps)).to_part()
    except ApiError as exc:
        # The fetcher's messages are fixed and generic; which part failed is ours to say.
        if exc.param is None or exc.param == "fps":
            exc.param = slot.param if exc.param is None else f"{slot.param}.fps"
        raise
