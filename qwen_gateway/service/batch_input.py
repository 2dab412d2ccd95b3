"""The Batch API's input rules: the create request's fields, each line of the input file, the
completion window and the metadata (DashScope's limits and messages), and the line's request id.
Pure functions, no I/O: service/batches.py runs them."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson

from qwen_gateway.errors import InvalidParameter
from qwen_gateway.store.batches import BatchRow, LineRow

# What the Batch API runs here. DashScope also takes /v1/embeddings and its test endpoint
# /v1/chat/ds-test; this gateway serves neither, so a batch for them is refused when it is created.
CHAT_ENDPOINT = "/v1/chat/completions"
NOT_SERVED = ("/v1/embeddings", "/v1/chat/ds-test")
# DashScope: the completion window is 24 to 336 hours, in hours ("24h") or days ("14d").
WINDOW = re.compile(r"^([1-9]\d{0,3})([hd])$")
MIN_WINDOW_HOURS, MAX_WINDOW_HOURS = 24, 336
METADATA_KEYS = 16
METADATA_VALUE_CHARS = 512


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a batch's input failed validation: DashScope's ``errors.data`` item."""

    code: str
    message: str
    param: str | None
    line: int | None


def line_request_id(batch_id: str, line: int) -> str:
    """The line's request id: the same on every attempt (its ledger row's unique key)."""
    return str(uuid.uuid5(uuid.UUID(batch_id.removeprefix("batch_")), str(line)))


def parse_window(value: Any) -> timedelta:
    if not isinstance(value, str) or not (match := WINDOW.match(value)):
        raise InvalidParameter(
            "completion_window must be a number of hours or days, such as 24h or 14d",
            param="completion_window",
        )
    hours = int(match.group(1)) * (24 if match.group(2) == "d" else 1)
    if not MIN_WINDOW_HOURS <= hours <= MAX_WINDOW_HOURS:
        raise InvalidParameter(
            f"completion_window should be in [{MIN_WINDOW_HOURS}h, {MAX_WINDOW_HOURS}h]",
            param="completion_window",
        )
    return timedelta(hours=hours)


def check_line(
    raw: bytes, number: int, batch: BatchRow, seen: set[str]
) -> tuple[Problem | None, LineRow | None]:
    """One input line: a problem that fails the batch, or the line to store. The request body itself is
    checked when the line runs (a bad body fails that line only)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Problem("invalid_json_line", "This line is not valid JSON.", None, number), None
    if not isinstance(value, dict):
        return Problem("invalid_json_line", "This line is not a JSON object.", None, number), None
    url = value.get("url")
    if not isinstance(url, str):
        return Problem(
            "missing_required_parameter", "The url of this request is missing.", "url", number
        ), None
    if url != batch.endpoint:
        if url == CHAT_ENDPOINT or url in NOT_SERVED:
            message = f"The url '{url[:128]}' does not match the batch's endpoint '{batch.endpoint}'."
            return Problem("mismatched_url", message, "url", number), None
        message = f"The provided url '{url[:128]}' is not supported by the Batch API."
        return Problem("url_not_found", message, "url", number), None
    method = value.get("method")
    if not isinstance(method, str) or method.upper() != "POST":
        return Problem("invalid_method", "The method of every request must be POST.", "method", number), None
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
        return Problem(
            "missing_required_parameter",
            "Every request needs a custom_id (a string of at most 512 characters).",
            "custom_id",
            number,
        ), None
    if custom_id in seen:
        return Problem(
            "duplicate_custom_id", f"The custom_id '{custom_id[:128]}' is used twice.", "custom_id", number
        ), None
    seen.add(custom_id)
    body = value.get("body")
    if not isinstance(body, dict):
        return Problem(
            "missing_required_parameter", "The body of this request must be a JSON object.", "body", number
        ), None
    for name in value:
        if name not in ("custom_id", "method", "url", "body"):
            return Problem(
                "invalid_parameter", f"Unknown field of a request line: {name[:64]}", name[:64], number
            ), None
    line = LineRow(
        batch_id=batch.id,
        line=number,
        custom_id=custom_id,
        request_id=line_request_id(batch.id, number),
        body=orjson.dumps(body).decode(),
        state="pending",
        result=None,
        attempts=0,
    )
    return None, line


def metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > METADATA_KEYS:
        raise InvalidParameter(
            f"metadata must be an object of at most {METADATA_KEYS} strings", param="metadata"
        )
    for name, item in value.items():
        if not isinstance(item, str) or len(name) > 64 or len(item) > METADATA_VALUE_CHARS:
            raise InvalidParameter(
                f"metadata values must be strings of at most {METADATA_VALUE_CHARS} characters",
                param="metadata",
            )
    return dict(value)


def plausible(batch_id: str) -> bool:
    """``batch_`` + a UUID: anything else is not looked up."""
    rest = batch_id.removeprefix("batch_")
    if rest == batch_id:
        return False
    try:
        return str(uuid.UUID(rest)) == rest
    except ValueError:
        return False


def problems_of(batch: BatchRow) -> list[Problem]:
    """The stored validation problems of a failed batch."""
    if batch.errors_json is None:
        return []
    return [Problem(**item) for item in orjson.loads(batch.errors_json)]
