"""Our Qwen-VL input builder (engines/local/vision.py) equals what each checkpoint's own processor
produces: the prompt ids (pad expansion, Qwen3-VL's per-group timestamps), the grids, and the pixels.

Two references:
- live: transformers' PIL image processor (``Qwen2VLImageProcessorPil``, no torchvision needed), for
  images: pixel values must be identical;
- ``data/vl_reference.npz``: the full ``AutoProcessor`` (image *and video* processors), which needs
  torchvision and therefore ran in a separate environment (``make_vl_reference.py``; its versions are
  stored in the file). Prompt ids and grids must be identical; pixel values are compared with a
  tolerance because that processor resizes with torchvision's bicubic kernel, not PIL's.
When the full processor can be imported here, the same comparison also runs live.
"""

from __future__ import annotations

import dataclasses
import threading
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch

from qwen_gateway.engines.base import (
    ChatMessage,
    GenerationRequest,
    ImagePart,
    MediaOptions,
    SamplingParams,
    TextPart,
    VideoPart,
)
from qwen_gateway.engines.local.prompt import PromptRenderer
from qwen_gateway.engines.local.vision import (
    VisionBuilder,
    VisionPrompt,
    VisionSpec,
    decode_rgb,
    image_patches,
)
from qwen_gateway.media.tokens import PixelBounds, VisionGeometry, image_layout, video_layout
from tests.unit.engines.vl_cases import CHECKPOINTS, MODELS, REFERENCE, Case, cases, frames_rgb

# torchvision's bicubic resize and PIL's differ near sharp edges (the cases' noise): measured on these
# cases, at most 0.39 in normalized units at a few pixels and under 0.007 on average. Where no resize
# happens (Qwen3-VL, 640x480) the values are identical, which pins normalization and patch order.
TORCHVISION_MAX_DIFF = 0.5
TORCHVISION_MEAN_DIFF = 0.01


@cache
def _loaded(name: str) -> tuple[Any, VisionBuilder, PromptRenderer]:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    path = MODELS / name
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32)
    spec = VisionSpec.from_checkpoint(path, AutoConfig.from_pretrained(str(path)))
    assert spec is not None
    renderer = PromptRenderer(tokenizer, threading.Lock())
    return spec, VisionBuilder(spec, renderer.encode, model.model.get_rope_index), renderer


def _request(case: Case, spec: VisionSpec) -> GenerationRequest:
    factor = spec.image.factor
    low, high = case.image_blocks
    messages = []
    for role, parts in case.turns:
        content: list[Any] = []
        for kind, value in parts:
            if kind == "text":
                content.append(TextPart(str(value)))
                continue
            media = case.media[int(value)]
            if media.kind == "image":
                content.append(ImagePart(media.frames[0], "image/png", low * factor**2, high * factor**2))
            else:
                content.append(VideoPart(media.frames, "image/png", media.fps))
        messages.append(ChatMessage(role, tuple(content)))  # type: ignore[arg-type]
    # High-resolution bounds so the case's own max (up to 16384 blocks) is not clamped to 1280.
    return GenerationRequest(
        "vision-case",
        "m",
        tuple(messages),
        SamplingParams(max_tokens=1),
        media=MediaOptions(high_resolution=True),
    )


def _build(name: str, case: Case) -> tuple[VisionPrompt, str]:
    spec, builder, renderer = _loaded(name)
    request = _request(case, spec)
    text = renderer.render_text(request)
    return builder.build(request, text), text


@cache
def _reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as data:
        return {k: data[k] for k in data.files}


ALL = [(n, c) for n in CHECKPOINTS for c in cases()]


@pytest.mark.parametrize(("name", "case"), ALL, ids=[f"{n}-{c.name}" for n, c in ALL])
def test_prompt_ids_and_grids_equal_the_processors(name: str, case: Case) -> None:
    prompt, _ = _build(name, case)
    ref = _reference()
    key = f"{name}/{case.name}"
    assert prompt.ids == ref[f"{key}/input_ids"].tolist()
    row = prompt.row
    for field, grid in (("image_grid_thw", row.image_grid_thw), ("video_grid_thw", row.video_grid_thw)):
        if f"{key}/{field}" in ref:
            assert grid is not None and grid.tolist() == ref[f"{key}/{field}"].tolist()
        else:
            assert grid is None
    # The billed counts are what the prompt really holds.
    spec = _loaded(name)[0]
    vision_ids = {spec.image_token_id, spec.video_token_id}
    pads = sum(1 for i in prompt.ids if i in vision_ids)
    grids = [g for g in (row.image_grid_thw, row.video_grid_thw) if g is not None]
    assert pads == sum(int(g.prod(-1).sum()) for g in grids) // spec.image.merge_size**2


@pytest.mark.parametrize(("name", "case"), ALL, ids=[f"{n}-{c.name}" for n, c in ALL])
def test_pixel_values_match_the_processors(name: str, case: Case) -> None:
    prompt, _ = _build(name, case)
    ref = _reference()
    key = f"{name}/{case.name}"
    for field, ours in (
        ("pixel_values", prompt.row.pixel_values),
        ("pixel_values_videos", prompt.row.pixel_values_videos),
    ):
        if f"{key}/{field}" not in ref:
            assert ours is None
            continue
        theirs = ref[f"{key}/{field}"]
        assert ours is not None and tuple(ours.shape) == theirs.shape
        diff = np.abs(ours.numpy() - theirs)
        assert float(diff.max()) < TORCHVISION_MAX_DIFF and float(diff.mean()) < TORCHVISION_MEAN_DIFF


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_image_pixels_identical_to_the_pil_image_processor(name: str) -> None:
    from transformers import AutoImageProcessor

    spec = _loaded(name)[0]
    processor = AutoImageProcessor.from_pretrained(str(MODELS / name), backend="pil")
    factor = spec.image.factor
    for case in cases():
        for media in case.media:
            if media.kind != "image":
                continue
            low, high = case.image_blocks
            bounds = PixelBounds(low * factor**2, high * factor**2)
            picture = decode_rgb(media.frames[0])
            layout = image_layout(picture.height, picture.width, spec.image, bounds)
            ours = image_patches(picture, layout, spec)
            out = processor(
                [frames_rgb(media.frames)[0]],
                size={"shortest_edge": bounds.min_pixels, "longest_edge": bounds.max_pixels},
                return_tensors="np",
            )
            assert out["image_grid_thw"].tolist() == [[1, layout.grid_h, layout.grid_w]]
            assert np.array_equal(ours, out["pixel_values"]), (case.name, name)


def _full_processor_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


# The same cases run against the processor's stored output in test_prompt_ids_and_grids_equal_the_processors;
# this one re-runs the processor live where torchvision imports (PyPI's torchvision fails beside torch
# 2.13.0+cpu, the build this project pins: see ../shared/models/README.md).
@pytest.mark.skipif(
    not _full_processor_importable(),
    reason="the live Qwen-VL AutoProcessor needs torchvision (absent beside torch 2.13.0+cpu); "
    "the stored-output test covers the same cases",
)
@pytest.mark.parametrize(("name", "case"), ALL, ids=[f"{n}-{c.name}" for n, c in ALL])
def test_prompt_ids_equal_the_live_processor(name: str, case: Case) -> None:
    from tests.unit.engines.make_vl_reference import run_processor

    prompt, _ = _build(name, case)
    assert prompt.ids == run_processor(name, case)["input_ids"].tolist()


# -- the token maths on the sizes the README and DashScope's docs quote ---------------------------------


@pytest.mark.parametrize(
    ("size", "tokens"),
    [((640, 480), 391 + 2), ((1024, 768), 999 + 2), ((448, 448), 256 + 2), ((28, 28), 4 + 2)],
)
def test_image_tokens_28px(size: tuple[int, int], tokens: int) -> None:
    geometry = VisionGeometry(14, 2, 2)
    bounds = PixelBounds(3136, 12845056)  # the README's default clamp (the checkpoint's own)
    assert image_layout(size[1], size[0], geometry, bounds).tokens == tokens


def test_image_tokens_32px_qwen3_vl() -> None:
    layout = image_layout(480, 640, VisionGeometry(16, 2, 2), PixelBounds(4 * 1024, 1280 * 1024))
    assert (layout.grid_h, layout.grid_w, layout.pads, layout.tokens) == (30, 40, 300, 302)


def test_video_tokens_match_dashscopes_four_frame_capture() -> None:
    # raw:multimodal-generation-vl-video-nosse: 4 frames of 3840x2160 -> 1440 video tokens (qwen-vl-max).
    layout = video_layout(4, 2160, 3840, VisionGeometry(14, 2, 2))
    assert layout.pads == 1440 and layout.tokens == 1440 + 2


def test_qwen3_vl_video_tokens_include_timestamps() -> None:
    layout = video_layout(
        4, 96, 128, VisionGeometry(16, 2, 2, video_timestamps=True), fps=1.0, count_text=len
    )
    assert layout.timestamps == ("<0.5 seconds>", "<2.5 seconds>")
    assert layout.tokens == layout.pads + 2 + 2 * 2 + 2 * len("<0.5 seconds>")


# -- the engine: chunked, batched prefill of VL rows decodes as transformers' own generate ------------


def _hf_logits(name: str, prompt: VisionPrompt, new_tokens: int) -> list[torch.Tensor]:
    """transformers' own generate() on the same inputs (the processor's, by the tests above): the raw
    logits of every step, greedy."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(MODELS / name), dtype=torch.float32).eval()
    spec = _loaded(name)[0]
    ids = torch.tensor([prompt.ids])
    types = torch.zeros_like(ids, dtype=torch.int32)
    types[ids == spec.image_token_id] = 1
    if spec.video_token_id is not None:
        types[ids == spec.video_token_id] = 2
    row = prompt.row
    kwargs: dict[str, Any] = {"mm_token_type_ids": types}
    if row.pixel_values is not None:
        kwargs.update(pixel_values=row.pixel_values, image_grid_thw=row.image_grid_thw)
    if row.pixel_values_videos is not None:
        kwargs.update(pixel_values_videos=row.pixel_values_videos, video_grid_thw=row.video_grid_thw)
    with torch.inference_mode():
        out = model.generate(
            ids,
            **kwargs,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return [step[0] for step in out.logits]


# Slow (3-7 s per checkpoint: a VL engine, then transformers' own generate for the reference): out of
# the quick run (`-m "not slow"`), in CI.
@pytest.mark.slow
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_engine_chunked_batched_vl_rows_match_transformers_generate(name: str, engine_factory: Any) -> None:
    """Three VL requests (one image, two images, a video) and a text-only row at once, prompts
    prefilled 16 tokens per step alongside decoding rows: every step's logits of each row equal
    transformers' generate() on that row alone (M-RoPE positions, vision features split across
    chunks, per-row rope deltas while decoding)."""
    import asyncio

    from qwen_gateway.engines.local.backends import BatchedBackend
    from tests.unit.engines.local_helpers import collect, run

    engine = engine_factory(MODELS / name, id=f"chunked-{name}", prefill_chunk=16)
    backend = engine._scheduler._backend
    assert isinstance(backend, BatchedBackend)
    seen: dict[str, list[torch.Tensor]] = {}
    original = backend.choose

    def recording(seqs: list[Any], logits: torch.Tensor, on_error: Any) -> None:
        for i, seq in enumerate(seqs):
            seen.setdefault(seq.request_id, []).append(logits[i].clone())
        original(seqs, logits, on_error)

    backend.choose = recording  # type: ignore[method-assign]
    chosen = [c for c in cases() if c.name in ("one-image", "two-images-high-res", "video-frames")]
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    requests = [
        dataclasses.replace(_request(case, _loaded(name)[0]), request_id=case.name, sampling=greedy)
        for case in chosen
    ]
    text_only = GenerationRequest("text", "m", (ChatMessage("user", "Only words here."),), greedy)

    async def all_at_once() -> list[Any]:
        return list(await asyncio.gather(*(collect(engine.generate(r)) for r in [*requests, text_only])))

    try:
        results = run(all_at_once())
    finally:
        backend.choose = original  # type: ignore[method-assign]
    for case, (_, finished) in zip(chosen, results, strict=False):
        prompt, _ = _build(name, case)
        assert finished.usage.prompt_tokens == len(prompt.ids)
        assert (finished.usage.image_tokens, finished.usage.video_tokens) == (
            prompt.image_tokens,
            prompt.video_tokens,
        )
        theirs = _hf_logits(name, prompt, 4)
        ours = seen[case.name]
        assert len(ours) == len(theirs) == 4
        for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (case.name, step, float((a - b).abs().max()))
