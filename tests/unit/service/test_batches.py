"""The Batch API's pure rules: completion windows, the batch price, line ids, line checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from qwen_gateway.engines.base import Usage
from qwen_gateway.errors import InvalidParameter
from qwen_gateway.service.batch_input import check_line as _check_line
from qwen_gateway.service.batch_input import line_request_id, parse_window
from qwen_gateway.service.batches import batch_cost, output_file_id
from qwen_gateway.service.money.prices import Price
from qwen_gateway.store.batches import BatchRow

BATCH_ID = "batch_2ecfc43e-439e-4443-bfe8-9a36b89456d0"


def _batch() -> BatchRow:
    now = datetime.now(UTC)
    return BatchRow(
        id=BATCH_ID,
        key_id="key_x",
        endpoint="/v1/chat/completions",
        input_file_id="file-batch-" + "0" * 24,
        completion_window="24h",
        status="validating",
        metadata_json=None,
        ds_name=None,
        errors_json=None,
        output_file_id=None,
        error_file_id=None,
        total=0,
        completed=0,
        failed=0,
        owner=None,
        deadline=now,
        created_at=now,
    )


@pytest.mark.parametrize(
    ("text", "hours"), [("24h", 24), ("1d", 24), ("14d", 336), ("336h", 336), ("48h", 48)]
)
def test_windows_in_hours_or_days(text: str, hours: int) -> None:
    assert parse_window(text) == timedelta(hours=hours)


@pytest.mark.parametrize("text", ["23h", "15d", "337h", "0h", "24", "24 h", "1w", 24, None, "024h"])
def test_windows_outside_the_range_or_malformed_are_refused(text: object) -> None:
    with pytest.raises(InvalidParameter) as caught:
        parse_window(text)
    assert caught.value.param == "completion_window"


def test_batch_price_is_the_percentage_rounded_up_once() -> None:
    price = Price(input_per_1k=1_000, output_per_1k=2_000)  # 0.001 and 0.002 CNY per 1K tokens
    usage = Usage(prompt_tokens=3, completion_tokens=1)
    # Live: (3*1000 + 1*2000) / 1000 = 5 µCNY; half of it is 2.5, charged 3.
    assert batch_cost(price, usage, 50) == 3
    assert batch_cost(price, usage, 100) == 5
    assert batch_cost(price, usage, 0) == 0
    assert batch_cost(Price(1_000_000, 2_000_000), Usage(26, 49), 50) == 62_000


def test_a_line_has_the_same_request_id_on_every_attempt() -> None:
    assert line_request_id(BATCH_ID, 3) == line_request_id(BATCH_ID, 3)
    assert line_request_id(BATCH_ID, 3) != line_request_id(BATCH_ID, 4)
    assert output_file_id(BATCH_ID, "output") == output_file_id(BATCH_ID, "output")
    assert output_file_id(BATCH_ID, "output").startswith("file-batch_output-")
    assert output_file_id(BATCH_ID, "output") != output_file_id(BATCH_ID, "error")


def _line(**fields: object) -> bytes:
    base: dict[str, object] = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    return orjson.dumps({**base, **fields})


@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        (b"{not json", "invalid_json_line", None),
        (b"[1, 2]", "invalid_json_line", None),
        (_line(url="/v1/chat/completion"), "url_not_found", "url"),
        (_line(url="/v1/embeddings"), "mismatched_url", "url"),
        (_line(method="GET"), "invalid_method", "method"),
        (_line(custom_id=""), "missing_required_parameter", "custom_id"),
        (_line(custom_id=7), "missing_required_parameter", "custom_id"),
        (_line(body="hi"), "missing_required_parameter", "body"),
        (_line(extra=1), "invalid_parameter", "extra"),
    ],
)
def test_line_problems_fail_the_batch(raw: bytes, code: str, param: str | None) -> None:
    problem, line = _check_line(raw, 5, _batch(), set())
    assert line is None and problem is not None
    assert (problem.code, problem.param, problem.line) == (code, param, 5)


def test_custom_ids_are_unique_and_a_good_line_is_stored() -> None:
    seen: set[str] = set()
    problem, line = _check_line(_line(body={"model": "m"}), 1, _batch(), seen)
    assert problem is None and line is not None
    assert (line.custom_id, line.state, orjson.loads(line.body)) == ("1", "pending", {"model": "m"})
    assert line.request_id == line_request_id(BATCH_ID, 1)
    problem, line = _check_line(_line(), 2, _batch(), seen)
    assert line is None and problem is not None and problem.code == "duplicate_custom_id"
