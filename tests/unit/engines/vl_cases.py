"""Vision inputs used to check our Qwen-VL input builder against the checkpoints' own processors.

Shared by ``test_local_vision.py`` and ``make_vl_reference.py`` (which runs the real transformers
processors, video processors included, in an environment that has torchvision, and stores what they
produce in ``data/vl_reference.npz``). Every picture is made here from a seed, so both sides see the
same bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MODELS = Path(__file__).resolve().parents[3] / ".." / "shared" / "models"
CHECKPOINTS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl")
REFERENCE = Path(__file__).resolve().parent / "data" / "vl_reference.npz"


def picture(width: int, height: int, seed: int, *, alpha: bool = False) -> bytes:
    """A PNG of smooth gradients plus noise (resampling filters then have real work to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), (x + y) % 256], axis=-1)
    noise = rng.integers(0, 64, (height, width, 3))
    rgb = ((base + noise) % 256).astype(np.uint8)
    if alpha:
        a = rng.integers(0, 256, (height, width, 1)).astype(np.uint8)
        image = Image.fromarray(np.concatenate([rgb, a], axis=-1), "RGBA")
    else:
        image = Image.fromarray(rgb, "RGB")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Media:
    kind: str  # "image" | "video"
    frames: tuple[bytes, ...]  # one for an image
    fps: float = 2.0


@dataclass(frozen=True)
class Case:
    name: str
    # (role, parts) with parts as ("text", str) | ("media", index into media)
    turns: tuple[tuple[str, tuple[tuple[str, str | int], ...]], ...]
    media: tuple[Media, ...]
    # Bounds in blocks (factor² pixels) for every image / every video frame of the case: the real
    # processors take one size per call.
    image_blocks: tuple[int, int] = (4, 1280)
    frame_blocks: tuple[int, int] = (4, 768)


def cases() -> list[Case]:
    still = Media("image", (picture(640, 480, 1),))
    small_alpha = Media("image", (picture(100, 80, 2, alpha=True),))
    tiny = Media("image", (picture(28, 28, 3),))
    odd = Media("image", (picture(300, 200, 4),))
    clip = Media("video", tuple(picture(128, 96, 10 + i) for i in range(4)), fps=2.0)
    long_clip = Media("video", tuple(picture(96, 64, 20 + i) for i in range(6)), fps=1.0)
    return [
        Case("one-image", (("user", (("text", "What is this"), ("media", 0))),), (still,)),
        Case(
            "two-images-high-res",
            (("user", (("text", "What are these"), ("media", 0), ("media", 1))),),
            (small_alpha, tiny),
            image_blocks=(4, 16384),
        ),
        Case("max-pixels", (("user", (("media", 0), ("text", "Read it."))),), (odd,), image_blocks=(4, 100)),
        Case(
            "video-frames", (("user", (("text", "Look:"), ("media", 0), ("text", "What happens?"))),), (clip,)
        ),
        Case(
            "earlier-turns",
            (
                ("user", (("media", 0), ("text", "Describe."))),
                ("assistant", (("text", "A gradient."),)),
                ("user", (("media", 1), ("text", "And this clip?"))),
            ),
            (small_alpha, long_clip),
        ),
    ]


def frames_rgb(frames: tuple[bytes, ...]) -> np.ndarray:
    """Frames decoded as ``[T, H, W, 3]`` uint8 (transparency composited onto white)."""
    out = []
    for data in frames:
        with Image.open(io.BytesIO(data)) as img:
            rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out.append(np.asarray(Image.alpha_composite(background, rgba).convert("RGB")))
    return np.stack(out)
