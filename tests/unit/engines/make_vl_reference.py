"""Run the checkpoints' real transformers processors on ``vl_cases`` and store what they produce.

The Qwen-VL ``AutoProcessor`` needs torchvision (its video processors use it), which does not load
beside this project's torch build; so this script runs in a separate environment that has torch and
torchvision of matching versions and the same transformers, e.g.::

    python -m venv /tmp/vlproof
    /tmp/vlproof/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.24.0 pillow numpy
    PYTHONPATH=. /tmp/vlproof/bin/python tests/unit/engines/make_vl_reference.py

It writes ``data/vl_reference.npz``: per checkpoint and case, the processor's ``input_ids``, grids and
pixel values. ``test_local_vision.py`` compares our builder against that file (and against the live
processor when it can be imported).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def render(tokenizer: Any, case: Any) -> str:
    messages = []
    for role, parts in case.turns:
        content = []
        for kind, value in parts:
            if kind == "text":
                content.append({"type": "text", "text": value})
            else:
                content.append({"type": case.media[int(value)].kind})
        messages.append({"role": role, "content": content})
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def run_processor(name: str, case: Any) -> dict[str, np.ndarray]:
    """The real processor's output for ``case`` on checkpoint ``name``."""
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    from tests.unit.engines.vl_cases import MODELS, frames_rgb

    processor = AutoProcessor.from_pretrained(str(MODELS / name))
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    images = [frames_rgb(m.frames)[0] for m in case.media if m.kind == "image"]
    videos = [frames_rgb(m.frames) for m in case.media if m.kind == "video"]
    kwargs: dict[str, Any] = {}
    if images:
        low, high = case.image_blocks
        kwargs["images"] = images
        kwargs["images_kwargs"] = {
            "size": {"shortest_edge": low * factor**2, "longest_edge": high * factor**2}
        }
    if videos:
        low, high = case.frame_blocks
        frames = len(videos[0])
        assert all(len(v) == frames for v in videos) and frames % 2 == 0
        # Per-frame bounds: Qwen2/2.5-VL's video processor bounds each frame; Qwen3-VL's bounds the
        # whole clip (frames × per-frame), which is the same for an even frame count.
        per_clip = "qwen3" in name
        scale = frames if per_clip else 1
        kwargs["videos"] = videos
        fps = [m.fps for m in case.media if m.kind == "video"]
        kwargs["video_metadata"] = [
            VideoMetadata(total_num_frames=len(v), fps=f, frames_indices=list(range(len(v))))
            for v, f in zip(videos, fps, strict=True)
        ]
        kwargs["videos_kwargs"] = {
            "size": {"shortest_edge": low * factor**2 * scale, "longest_edge": high * factor**2 * scale},
            "do_sample_frames": False,
            "cap_pixels_per_frame": False,
        }
    text = render(processor.tokenizer, case)
    out = processor(text=[text], return_tensors="np", **kwargs)
    result = {"input_ids": np.asarray(out["input_ids"][0], dtype=np.int64)}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if key in out:
            result[key] = np.asarray(out[key])
    return result


def main() -> int:
    from tests.unit.engines.vl_cases import CHECKPOINTS, REFERENCE, cases

    arrays: dict[str, np.ndarray] = {}
    for name in CHECKPOINTS:
        for case in cases():
            for key, value in run_processor(name, case).items():
                arrays[f"{name}/{case.name}/{key}"] = value
    import torch
    import torchvision
    import transformers

    arrays["versions"] = np.array(
        [
            f"torch {torch.__version__}",
            f"torchvision {torchvision.__version__}",
            f"transformers {transformers.__version__}",
        ]
    )
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(REFERENCE, **arrays)
    print(f"wrote {len(arrays)} arrays to {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
