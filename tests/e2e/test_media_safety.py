"""Media safety through the real server: every refusal of the media fetcher is a 400 in DashScope's
shape with its fixed message, names the part, charges nothing (no ledger row), reaches no forbidden
listener, and the server goes on serving."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import av
import httpx
import numpy as np
import pytest

from tests.media_support import (
    CountingListener,
    MediaServer,
    bomb_png,
    png_bytes,
    running_media_server,
)
from tests.support import MODELS, Server, start_server

PREFIX = "<400> InternalError.Algo.InvalidParameter: "
REFUSED = PREFIX + "The provided URL is not allowed."
FAILED = PREFIX + "Failed to download multimodal content"

CONFIG = """
[media]
allow_hosts = ["127.0.0.1"]
max_image_bytes = 100000
fetch_timeout = 3.0
max_video_seconds = 1.5

[[models]]
id = "qwen3-vl-plus"
path = "{qwen3vl}"
max_output = 4
"""


def mp4(seconds: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream: Any = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 8)
        for i in range(seconds * 8):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 15 * i, dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 8)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def media() -> Iterator[MediaServer]:
    with running_media_server() as server:
        server.files["/clip.mp4"] = ("video/mp4", mp4(2))
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("media-safety-home")
    config = home / "config.toml"
    config.write_text(CONFIG.format(qwen3vl=MODELS / "tiny-qwen3-vl"))
    srv = start_server(home, "--config", str(config))
    yield srv
    srv.stop()


@pytest.fixture
def private() -> Iterator[CountingListener]:
    """A listener on a loopback address the server is not allowed to reach."""
    listener = CountingListener("127.0.0.2")
    yield listener
    listener.close()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat(server: Server, part: dict[str, Any], *, stream: bool = False) -> httpx.Response:
    return httpx.post(
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={
            "model": "qwen3-vl-plus",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}],
            "max_tokens": 2,
            "stream": stream,
        },
        timeout=120,
    )


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def assert_refused(
    server: Server, r: httpx.Response, message: str, param: str = "messages.0.content.1"
) -> None:
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"] == {
        "code": "invalid_parameter_error",
        "type": "invalid_request_error",
        "param": param,
        "message": message,
    }
    assert body["request_id"] == r.headers["x-request-id"]
    assert "127.0.0.2" not in r.text and "Traceback" not in r.text
    assert server.ledger(body["request_id"]) == []  # nothing charged, not even a zero row


def test_forbidden_targets_are_refused_and_never_reached(
    server: Server, media: MediaServer, private: CountingListener
) -> None:
    port = private.port
    for url in (
        f"http://127.0.0.2:{port}/x.png",
        f"http://2130706434:{port}/x.png",
        f"http://0x7f.0.0.2:{port}/x.png",
        f"http://[::ffff:127.0.0.2]:{port}/x.png",
        f"http://allowed@127.0.0.2:{port}/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",
        "http://[::1]/x.png",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_INFO",
        media.url(f"/redirect?to=http://127.0.0.2:{port}/x.png"),  # an allowed host redirecting inward
    ):
        assert_refused(server, chat(server, image(url)), REFUSED)
    assert private.connections() == 0


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (image("{media}/missing.png"), FAILED),
        (image("{media}/chain/9"), FAILED),  # more redirects than allowed
        (image("{media}/big.png"), PREFIX + "The multimodal file exceeds the size limit of 100000 bytes."),
        (image("{media}/stall"), PREFIX + "Download multimodal file timed out"),
        (image("{media}/text.png"), PREFIX + "The image format is illegal and cannot be opened."),
        (
            image(data_url(b"%PDF-1.7 definitely not a PNG" * 4)),
            PREFIX + "The image format is illegal and cannot be opened.",
        ),
        (
            image(data_url(bomb_png(100_000, 100_000))),
            PREFIX + "The image length and width do not meet the model restrictions. "
            "[height*width must not exceed 50000000]",
        ),
        (
            {"type": "video", "video": ["{media}/img.png"] * 3},
            PREFIX + "The range of sequence images shoule be (4, 512).",
        ),
        (
            {"type": "video_url", "video_url": {"url": "{media}/clip.mp4"}, "fps": 2},
            PREFIX + "The video is longer than 1.5 seconds.",
        ),
        (
            {"type": "video_url", "video_url": {"url": data_url(png_bytes(), "video/mp4")}},
            PREFIX + "The video format is illegal and cannot be opened.",
        ),
    ],
)
def test_each_refusal_is_a_400_with_its_fixed_message(
    server: Server, media: MediaServer, part: dict[str, Any], message: str
) -> None:
    base = media.url("")
    filled = _fill(part, base)
    assert_refused(server, chat(server, filled), message)


def _fill(node: Any, base: str) -> Any:
    if isinstance(node, str):
        return node.replace("{media}", base)
    if isinstance(node, list):
        return [_fill(n, base) for n in node]
    if isinstance(node, dict):
        return {k: _fill(v, base) for k, v in node.items()}
    return node


def test_data_url_over_10_mb(server: Server) -> None:
    url = "data:image/png;base64," + "A" * (14 * 1024 * 1024)
    assert_refused(
        server, chat(server, image(url)), "Exceeded limit on max bytes per data-uri item : 10485760"
    )


def test_fps_outside_the_range_names_the_part(server: Server, media: MediaServer) -> None:
    part = {"type": "video_url", "video_url": {"url": media.url("/clip.mp4")}, "fps": 50}
    r = chat(server, part)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.1.fps"


def test_stream_refusal_comes_before_any_event(server: Server, private: CountingListener) -> None:
    r = chat(server, image(f"http://127.0.0.2:{private.port}/x.png"), stream=True)
    assert_refused(server, r, REFUSED)
    assert "data:" not in r.text
    assert private.connections() == 0


def test_server_keeps_serving_after_refusals(server: Server, media: MediaServer) -> None:
    for _ in range(3):
        assert chat(server, image(data_url(bomb_png(100_000, 100_000)))).status_code == 400
        assert chat(server, image(media.url("/text.png"))).status_code == 400
    assert chat(server, image(media.url("/stall"))).status_code == 400
    r = chat(server, image(media.url("/img.png")))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 0
    rows = server.ledger(r.headers["x-request-id"])
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
