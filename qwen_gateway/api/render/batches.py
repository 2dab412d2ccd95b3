"""Batch objects and the lines of batch output/error files, in compatible mode's shape (the captures:
``create-batch-compatible``, ``get-*-batch-compatible``, ``list-batches-*``, ``get-file-content``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from qwen_gateway.api.render import compat
from qwen_gateway.errors import ApiError
from qwen_gateway.service.batches import problems_of
from qwen_gateway.service.events import ChatResult
from qwen_gateway.service.validation import ChatCall
from qwen_gateway.store.batches import BatchRow


def _ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def batch_object(row: BatchRow) -> dict[str, Any]:
    """The batch object, keys in the captures' order. ``expires_at`` is null, as DashScope shows it."""
    problems = problems_of(row)
    return {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": None
        if not problems
        else {
            "object": "list",
            "data": [
                {"code": p.code, "message": p.message, "param": p.param, "line": p.line} for p in problems
            ],
        },
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": _ts(row.created_at),
        "in_progress_at": _ts(row.in_progress_at),
        "expires_at": None,
        "finalizing_at": _ts(row.finalizing_at),
        "completed_at": _ts(row.completed_at),
        "failed_at": _ts(row.failed_at),
        "expired_at": _ts(row.expired_at),
        "cancelling_at": _ts(row.cancelling_at),
        "cancelled_at": _ts(row.cancelled_at),
        "request_counts": {"total": row.total, "completed": row.completed, "failed": row.failed},
        "metadata": None if row.metadata_json is None else orjson.loads(row.metadata_json),
    }


def batch_list(rows: list[BatchRow], has_more: bool) -> dict[str, Any]:
    """A page of batches; an empty page has ``data: null`` (list-batches-empty-compatible)."""
    return {
        "object": "list",
        "data": [batch_object(r) for r in rows] or None,
        "first_id": rows[0].id if rows else None,
        "last_id": rows[-1].id if rows else None,
        "has_more": has_more,
    }


class FileLines:
    """The output and error file lines (:class:`~qwen_gateway.service.batches.LineRenderer`).

    An output line is the capture's ``{"id", "custom_id", "response": {"status_code": 200, "request_id",
    "body": <chat.completion>}, "error": null}``. No capture shows an error-file line; it is the same
    frame with the refusal's HTTP status and DashScope error body as ``response``, and ``error`` holding
    its code and message (what OpenAI-style clients read either way)."""

    def success(self, *, request_id: str, custom_id: str | None, call: ChatCall, result: ChatResult) -> str:
        body = compat.completion_body(call, result)
        line = {
            "id": request_id,
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body},
            "error": None,
        }
        return orjson.dumps(line).decode()

    def failure(self, *, request_id: str, custom_id: str | None, error: ApiError) -> str:
        line = {
            "id": request_id,
            "custom_id": custom_id,
            "response": {
                "status_code": error.status,
                "request_id": request_id,
                "body": compat.api_error_body(error, request_id),
            },
            "error": {"code": error.code, "message": error.message},
        }
        return orjson.dumps(line).decode()
