"""Vision through the real server: the tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints behind
DashScope ids, driven with the openai SDK, LangChain and raw HTTP.

Media comes from a loopback HTTP server this module starts and opens in ``[media] allow_hosts``, or
from ``data:`` URLs. Every ``prompt_tokens`` is checked against DashScope's formula for the sizes used
(one token per 28×28 block for Qwen2/2.5-VL, 32×32 for Qwen3-VL, +2 per image) on top of the text the
chat template renders, which is the engine's input length (the unit tests prove the engine's input
equals the checkpoint's own processor output).
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import math
import threading
from collections.abc import Iterator
from fractions import Fraction
from functools import cache
from typing import Any

import httpx
import numpy as np
import pytest
from langchain_openai import ChatOpenAI
from openai import OpenAI
from PIL import Image
from transformers import AutoTokenizer

from tests.support import MODELS, Server, assert_schema, start_server

# id -> (checkpoint, block side in pixels)
VL = {
    "qwen3-vl-plus": ("tiny-qwen3-vl", 32),
    "qwen-vl-max": ("tiny-qwen2.5-vl", 28),
    "qwen2-vl-7b-instruct": ("tiny-qwen2-vl", 28),
}
CONFIG = """
[media]
allow_hosts = ["127.0.0.1"]

[[models]]
id = "qwen3-vl-plus"
path = "{qwen3vl}"
max_output = 2048

[[models]]
id = "qwen-vl-max"
path = "{qwen25vl}"
max_output = 32

[[models]]
id = "qwen2-vl-7b-instruct"
path = "{qwen2vl}"
max_output = 32

[[models]]
id = "qwen-vl-ocr"
path = "{qwen3vl}"
max_output = 16

[[models]]
id = "qwen-plus"
path = "{qwen25}"
max_output = 16
"""
# Sampling set explicitly: the VL checkpoints' generation_config is near-greedy (top_k=1, top_p=0.001).
SAMPLING: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "seed": 7, "extra_body": {"top_k": 0}}


def png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def mp4(seconds: int, fps: int, width: int = 64, height: int = 48) -> bytes:
    """A real H.264 MP4 made with PyAV, in memory."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        for i in range(seconds * fps):
            array = np.full((height, width, 3), (i * 9) % 256, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


class MediaServer:
    """Serves fixed bytes by path on loopback and counts requests per path."""

    def __init__(self, files: dict[str, tuple[bytes, str]]) -> None:
        self.files = files
        self.hits: dict[str, int] = {}
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits[self.path] = owner.hits.get(self.path, 0) + 1
                body, mime = owner.files.get(self.path, (b"", ""))
                self.send_response(200 if mime else 404)
                self.send_header("Content-Type", mime or "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def media() -> Iterator[MediaServer]:
    files = {
        "/dog_and_girl.jpeg": (png(640, 480, 1), "image/jpeg"),  # the type the URL claims; bytes are PNG
        "/tiger.png": (png(1024, 768, 2), "image/png"),
        "/big.png": (png(2000, 1500, 3), "image/png"),
        "/clip.mp4": (mp4(seconds=2, fps=8), "video/mp4"),
    }
    for i in range(4):
        files[f"/football{i + 1}.jpg"] = (png(384, 216, 10 + i), "image/png")
    srv = MediaServer(files)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def vl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("vision-home")
    config = home / "config.toml"
    config.write_text(
        CONFIG.format(
            qwen3vl=MODELS / "tiny-qwen3-vl",
            qwen25vl=MODELS / "tiny-qwen2.5-vl",
            qwen2vl=MODELS / "tiny-qwen2-vl",
            qwen25=MODELS / "tiny-qwen2.5",
        )
    )
    srv = start_server(home, "--config", str(config))
    yield srv
    srv.stop()


def client(server: Server) -> OpenAI:
    return OpenAI(api_key=server.api_key, base_url=server.compat_url)


# -- DashScope's formula, and the text the template renders -------------------------------------------


def image_tokens(width: int, height: int, block: int, max_blocks: int = 1280, min_blocks: int = 4) -> int:
    """reference §4.4: round to multiples of the block, scale into [min, max] blocks, + 2."""
    h, w = round(height / block) * block, round(width / block) * block
    if h * w > max_blocks * block * block:
        beta = math.sqrt(height * width / (max_blocks * block * block))
        h, w = math.floor(height / beta / block) * block, math.floor(width / beta / block) * block
    elif h * w < min_blocks * block * block:
        beta = math.sqrt(min_blocks * block * block / (height * width))
        h, w = math.ceil(height * beta / block) * block, math.ceil(width * beta / block) * block
    return h * w // (block * block) + 2


@cache
def tokenizer(checkpoint: str) -> Any:
    return AutoTokenizer.from_pretrained(MODELS / checkpoint)


def text_tokens(model_id: str, content: list[dict[str, Any]]) -> int:
    """Tokens of the rendered prompt that are not image pads/start/end (one placeholder per image)."""
    tok = tokenizer(VL[model_id][0])
    parts = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
    text = tok.apply_chat_template(
        [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False
    )
    images = sum(1 for p in parts if p["type"] == "image")
    # Each image renders as <|vision_start|><|image_pad|><|vision_end|>: 3 tokens the formula counts.
    return len(tok(text, add_special_tokens=False)["input_ids"]) - 3 * images


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# -- images --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", list(VL))
def test_one_image_billed_by_the_formula(vl_server: Server, media: MediaServer, model_id: str) -> None:
    content = [
        {"type": "text", "text": "What is this"},
        {"type": "image_url", "image_url": {"url": media.url("/dog_and_girl.jpeg")}},
    ]
    r = client(vl_server).chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": content}], max_tokens=8, **SAMPLING
    )
    block = VL[model_id][1]
    usage = r.usage
    assert usage is not None
    expected_image = image_tokens(640, 480, block)
    assert expected_image == (391 + 2 if block == 28 else 300 + 2)  # README: 640x480 -> 391 / 300
    assert usage.prompt_tokens == text_tokens(model_id, content) + expected_image
    details = r.model_dump()["usage"]["prompt_tokens_details"]
    assert details["image_tokens"] == expected_image
    assert details["text_tokens"] == usage.prompt_tokens - expected_image
    assert usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    assert_schema(json.loads(r.model_dump_json(exclude_unset=True)), "CreateChatCompletionResponse")


def test_two_images_and_a_base64_image_in_earlier_turns(vl_server: Server, media: MediaServer) -> None:
    """Seed 000's two-image request, plus a data: URL image in an earlier turn of the conversation."""
    first = [
        {"type": "image_url", "image_url": {"url": data_url(png(448, 448, 5))}},
        {"type": "text", "text": "Remember this."},
    ]
    second = [
        {"type": "text", "text": "What are these"},
        {"type": "image_url", "image_url": {"url": media.url("/dog_and_girl.jpeg")}},
        {"type": "image_url", "image_url": {"url": media.url("/tiger.png")}},
    ]
    messages = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": "OK."},
        {"role": "user", "content": second},
    ]
    r = client(vl_server).chat.completions.create(
        model="qwen-vl-max",
        messages=messages,
        max_tokens=4,
        **SAMPLING,  # type: ignore[arg-type]
    )
    assert r.usage is not None
    expected = image_tokens(448, 448, 28) + image_tokens(640, 480, 28) + image_tokens(1024, 768, 28)
    assert expected == 258 + 393 + 1001  # README: 448x448 -> 256, 1024x768 -> 999 (+2 each)
    assert r.model_dump()["usage"]["prompt_tokens_details"]["image_tokens"] == expected


def test_stream_with_include_usage_seed_shape(vl_server: Server, media: MediaServer) -> None:
    """Seed 000's OpenAI SDK stream: role chunk, content chunks, finish chunk, then a usage chunk with
    no choices."""
    content = [
        {"type": "text", "text": "What is this"},
        {"type": "image_url", "image_url": {"url": media.url("/dog_and_girl.jpeg")}},
    ]
    stream = client(vl_server).chat.completions.create(
        model="qwen3-vl-plus",
        messages=[{"role": "user", "content": content}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=6,
        **SAMPLING,
    )
    raw = list(stream)
    chunks = [c.model_dump() for c in raw]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["choices"][0]["delta"]["content"] == ""
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    assert last["usage"]["prompt_tokens"] == text_tokens("qwen3-vl-plus", content) + 302
    assert last["usage"]["prompt_tokens_details"]["image_tokens"] == 302
    for chunk in raw:  # what the server sent, checked against the OpenAI spec
        assert_schema(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")


def test_langchain_invoke_and_stream(vl_server: Server, media: MediaServer) -> None:
    """Seed 000's LangChain examples (non-streaming invoke, streaming with include_usage)."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this"},
                {"type": "image_url", "image_url": {"url": media.url("/dog_and_girl.jpeg")}},
            ],
        }
    ]
    common: dict[str, Any] = {
        "api_key": vl_server.api_key,
        "base_url": vl_server.compat_url,
        "model": "qwen3-vl-plus",
    }
    llm = ChatOpenAI(max_tokens=5, temperature=1.0, top_p=1.0, seed=3, extra_body={"top_k": 0}, **common)
    msg = llm.invoke(messages)
    assert isinstance(msg.content, str)
    usage = msg.usage_metadata
    assert usage is not None and usage["output_tokens"] == 5
    assert usage["input_tokens"] == text_tokens("qwen3-vl-plus", messages[0]["content"]) + 302
    streaming = ChatOpenAI(
        max_tokens=5,
        temperature=1.0,
        top_p=1.0,
        seed=3,
        extra_body={"top_k": 0},
        stream_options={"include_usage": True},
        **common,
    )
    chunks = list(streaming.stream(messages))
    with_usage = [c for c in chunks if c.usage_metadata]
    assert len(with_usage) == 1 and with_usage[0].usage_metadata["input_tokens"] == usage["input_tokens"]


def test_high_resolution_and_pixel_bounds(vl_server: Server, media: MediaServer) -> None:
    def image_tokens_of(extra: dict[str, Any], image: dict[str, Any]) -> int:
        r = httpx.post(
            f"{vl_server.compat_url}/chat/completions",
            headers={"Authorization": f"Bearer {vl_server.api_key}"},
            json={
                "model": "qwen3-vl-plus",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": image}]}],
                "max_tokens": 1,
                **extra,
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text
        return int(r.json()["usage"]["prompt_tokens_details"]["image_tokens"])

    big = {"url": media.url("/big.png")}
    assert image_tokens_of({}, big) == image_tokens(2000, 1500, 32) <= 1280 + 2  # capped at 1280
    assert image_tokens_of({"vl_high_resolution_images": True}, big) == image_tokens(2000, 1500, 32, 16384)
    assert image_tokens(2000, 1500, 32, 16384) > 1282
    # A request's own max_pixels narrows the bound; one above the cap is held at the cap.
    assert image_tokens_of({}, {**big, "max_pixels": 100 * 32 * 32}) == image_tokens(2000, 1500, 32, 100)
    assert image_tokens_of({}, {**big, "max_pixels": 10**9}) == image_tokens(2000, 1500, 32)
    # 4 blocks of a 4:3 picture floor to 1x2 blocks (the processors and DashScope's formula agree).
    assert (
        image_tokens_of({}, {**big, "min_pixels": 1, "max_pixels": 4 * 32 * 32})
        == image_tokens(2000, 1500, 32, 4)
        == 2 + 2
    )


# -- video ---------------------------------------------------------------------------------------------


def test_frame_list_video_seed_002(vl_server: Server, media: MediaServer) -> None:
    """Seed 002's video request (a list of frame URLs) on Qwen2.5-VL: one block of pads for the video."""
    frames = [media.url(f"/football{i}.jpg") for i in range(1, 5)]
    r = client(vl_server).chat.completions.create(
        model="qwen-vl-max",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": frames},
                    {"type": "text", "text": "描述这个视频的具体过程"},
                ],  # type: ignore[list-item, misc]
            }
        ],
        max_tokens=4,
        **SAMPLING,
    )
    details = r.model_dump()["usage"]["prompt_tokens_details"]
    # 384x216 frames -> 392x224 (14x8 blocks of 28 px), 4 frames -> 2 temporal groups, + start/end.
    assert details["video_tokens"] == 2 * 14 * 8 + 2
    assert r.usage is not None and r.usage.prompt_tokens == details["text_tokens"] + details["video_tokens"]


def test_mp4_video_url_sampled_at_fps_with_qwen3_timestamps(vl_server: Server, media: MediaServer) -> None:
    """A 2 s MP4 made by the test, sampled at fps=2 (4 frames): Qwen3-VL writes one timestamped block
    per temporal group, and the count includes the timestamps."""

    def ask(fps: float) -> dict[str, Any]:
        r = httpx.post(
            f"{vl_server.compat_url}/chat/completions",
            headers={"Authorization": f"Bearer {vl_server.api_key}"},
            json={
                "model": "qwen3-vl-plus",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "video_url", "video_url": {"url": media.url("/clip.mp4")}, "fps": fps},
                            {"type": "text", "text": "What happens?"},
                        ],
                    }
                ],
                "max_tokens": 2,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text
        lines = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
        return dict(lines[-1]["usage"])

    tok = tokenizer("tiny-qwen3-vl")
    stamp = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    # 64x48 frames -> 64x64 (2x2 blocks of 32 px: the 4-block minimum) per temporal group.
    at2 = ask(2.0)["prompt_tokens_details"]["video_tokens"]
    assert at2 == 2 + 2 * (4 + 2) + stamp("<0.2 seconds>") + stamp("<1.2 seconds>")
    at4 = ask(4.0)["prompt_tokens_details"]["video_tokens"]  # 8 frames -> 4 groups
    assert at4 == 2 + 4 * (4 + 2) + sum(stamp(f"<{t:.1f} seconds>") for t in (0.125, 0.625, 1.125, 1.625))


# -- refusals --------------------------------------------------------------------------------------------


def test_text_model_refuses_an_image_with_dashscopes_error(vl_server: Server, media: MediaServer) -> None:
    hits = dict(media.hits)
    r = httpx.post(
        f"{vl_server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {vl_server.api_key}"},
        json={
            "model": "qwen-plus",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": media.url("/tiger.png")}}],
                }
            ],
        },
        timeout=60,
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_parameter_error" and error["type"] == "invalid_request_error"
    assert "Unexpected item type in content" in error["message"]
    assert error["param"] == "messages.0.content.0"
    assert media.hits == hits  # refused before anything was fetched
    assert vl_server.ledger(r.json()["request_id"]) == []


def test_image_only_model_refuses_video(vl_server: Server, media: MediaServer) -> None:
    r = httpx.post(
        f"{vl_server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {vl_server.api_key}"},
        json={
            "model": "qwen-vl-ocr",
            "messages": [
                {"role": "user", "content": [{"type": "video", "video": [media.url("/tiger.png")] * 4}]}
            ],
        },
        timeout=60,
    )
    assert r.status_code == 400 and "Unexpected item type" in r.json()["error"]["message"]


def test_media_refusal_is_a_400_naming_the_part(vl_server: Server) -> None:
    r = httpx.post(
        f"{vl_server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {vl_server.api_key}"},
        json={
            "model": "qwen3-vl-plus",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "x"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
                    ],
                }
            ],
        },
        timeout=60,
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages.0.content.1"
    assert vl_server.ledger(r.json()["request_id"]) == []


# -- OCR -------------------------------------------------------------------------------------------------

OCR_TASKS = [
    {"task": "text_recognition"},
    {
        "task": "key_information_extraction",
        "task_config": {"result_schema": {"发票号码": "提取发票上的号码"}},
    },
    {"task": "table_parsing"},
    {"task": "document_parsing"},
    {"task": "formula_recognition"},
    {"task": "multi_lan"},
    {"task": "advanced_recognition"},
]


def ocr(server: Server, image_url: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={
            "model": extra.pop("model", "qwen-vl-ocr"),
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}]}
            ],
            "max_tokens": 2,
            **extra,
        },
        timeout=120,
    )


def test_ocr_tasks_build_their_prompts(vl_server: Server, media: MediaServer) -> None:
    url = media.url("/dog_and_girl.jpeg")
    plain = ocr(vl_server, url)
    assert plain.status_code == 200, plain.text
    base = plain.json()["usage"]["prompt_tokens"]
    seen = set()
    for options in OCR_TASKS:
        r = ocr(vl_server, url, ocr_options=options)
        assert r.status_code == 200, (options, r.text)
        usage = r.json()["usage"]
        # The server's task prompt is part of the prompt (and billed), on top of the image.
        assert usage["prompt_tokens"] > base
        assert (
            usage["prompt_tokens_details"]["image_tokens"]
            == plain.json()["usage"]["prompt_tokens_details"]["image_tokens"]
        )
        seen.add(usage["prompt_tokens"])
    assert len(seen) >= 6  # the tasks' prompts differ


def test_ocr_default_pixel_bounds(vl_server: Server, media: MediaServer) -> None:
    """Qwen-OCR sizes images within its own bounds (up to 8192 blocks of 32 px), not the 1280 cap."""
    url = media.url("/big.png")
    ocr_tokens = ocr(vl_server, url).json()["usage"]["prompt_tokens_details"]["image_tokens"]
    vl_tokens = ocr(vl_server, url, model="qwen3-vl-plus").json()["usage"]["prompt_tokens_details"][
        "image_tokens"
    ]
    assert ocr_tokens == image_tokens(2000, 1500, 32, 8192, 3) > vl_tokens == image_tokens(2000, 1500, 32)


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"task": "handwriting"}, "ocr_options.task"),
        ({}, "ocr_options.task"),
        ({"task": "key_information_extraction"}, "ocr_options.task_config"),
        (
            {"task": "key_information_extraction", "task_config": {"result_schema": {}}},
            "ocr_options.task_config.result_schema",
        ),
        ({"task": "table_parsing", "task_config": {"result_schema": {"a": "b"}}}, "ocr_options.task_config"),
        ({"task": "text_recognition", "rotate": True}, "ocr_options"),
    ],
)
def test_bad_ocr_options_are_400(
    vl_server: Server, media: MediaServer, options: dict[str, Any], param: str
) -> None:
    r = ocr(vl_server, media.url("/tiger.png"), ocr_options=options)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_ocr_options_on_a_non_ocr_model_is_400(vl_server: Server, media: MediaServer) -> None:
    r = ocr(
        vl_server, media.url("/tiger.png"), model="qwen3-vl-plus", ocr_options={"task": "text_recognition"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "ocr_options"


# -- four streams at once ---------------------------------------------------------------------------------


def test_four_vl_streams_decode_together(vl_server: Server, media: MediaServer) -> None:
    """Each stream reads up to its first content chunk, then waits until all four have one; every stream
    then still gets more content: no stream had finished before the last one started, so the engine
    was generating all four at once (the batched scheduler decodes them in one forward pass)."""
    barrier = threading.Barrier(4, timeout=300)
    after: list[int] = [0, 0, 0, 0]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            stream = client(vl_server).chat.completions.create(
                model="qwen3-vl-plus",
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": media.url("/dog_and_girl.jpeg")}},
                            {"type": "text", "text": f"Story number {i}"},
                        ],
                    }
                ],
                stream=True,
                max_tokens=2000,
                temperature=1.0,
                top_p=1.0,
                seed=100 + i,
                extra_body={"top_k": 0},
            )
            with stream:
                waited = False
                for chunk in stream:
                    if not chunk.choices or not chunk.choices[0].delta.content:
                        continue
                    if not waited:
                        barrier.wait()
                        waited = True
                        continue
                    after[i] += 1
                    if after[i] >= 3:
                        break  # enough: closing the stream cancels the rest of the generation
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert after == [3, 3, 3, 3]
