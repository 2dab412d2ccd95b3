"""Qwen-OCR's built-in tasks (``ocr_options``): the server writes each task's prompt.

DashScope documents the task names and what each returns (plain text, a JSON object following
``task_config.result_schema``, HTML tables, LaTeX, located text lines) but the copies of its docs in
``shared/`` do not carry the exact built-in prompt texts, so the prompts below are our own wording of
what each task asks for. The prompt is added as the last text of the last user message, after
whatever the client wrote there.
"""

from __future__ import annotations

from typing import Any

import orjson

from qwen_gateway.errors import InvalidParameter

TASK_PROMPTS: dict[str, str] = {
    "text_recognition": (
        "Read all the text in the image and output only that text, line by line, without any "
        "description, explanation or formatting."
    ),
    "key_information_extraction": (
        "Extract the following fields from the image. Answer with one JSON object that has exactly the "
        "keys of this schema (nested the same way); each value in the schema describes what to put "
        "there. Use null for a field the image does not show.\n{schema}"
    ),
    "table_parsing": (
        "Parse every table in the image and output it as an HTML <table>, keeping merged cells "
        "(rowspan/colspan) and the text of each cell exactly as shown."
    ),
    "document_parsing": (
        "Transcribe the document in the image, its text, tables and formulas, into LaTeX, in reading "
        "order and without changing the content."
    ),
    "formula_recognition": "Recognize the mathematical formulas in the image and output them in LaTeX.",
    "multi_lan": (
        "Read all the text in the image, whatever languages it is written in, and output only that "
        "text, line by line, in its original languages."
    ),
    "advanced_recognition": (
        "Locate every line of text in the image. Output a JSON list with one object per line: "
        '{"text": the line\'s text, "rotate_rect": [center x, center y, width, height, angle]}, with '
        "coordinates in the image's pixels."
    ),
}
KNOWN_KEYS = frozenset({"task", "task_config"})


def task_prompt(options: Any) -> str:
    """The prompt for ``ocr_options``, or a 400 naming what is wrong with it."""
    if not isinstance(options, dict):
        raise InvalidParameter("ocr_options must be an object.", param="ocr_options")
    unknown = sorted(set(options) - KNOWN_KEYS)
    if unknown:
        raise InvalidParameter(f"ocr_options has unknown fields: {', '.join(unknown)}", param="ocr_options")
    task = options.get("task")
    if task not in TASK_PROMPTS:
        names = ", ".join(TASK_PROMPTS)
        raise InvalidParameter(
            f"ocr_options.task must be one of [{names}], got {task!r}.", param="ocr_options.task"
        )
    config = options.get("task_config")
    if task != "key_information_extraction":
        if config is not None:
            raise InvalidParameter(
                "ocr_options.task_config is only used by the key_information_extraction task.",
                param="ocr_options.task_config",
            )
        return TASK_PROMPTS[task]
    schema = config.get("result_schema") if isinstance(config, dict) else None
    if not isinstance(config, dict) or set(config) - {"result_schema"}:
        raise InvalidParameter(
            'ocr_options.task_config must be {"result_schema": {...}} for key_information_extraction.',
            param="ocr_options.task_config",
        )
    if not isinstance(schema, dict) or not schema:
        raise InvalidParameter(
            "ocr_options.task_config.result_schema must be a non-empty JSON object.",
            param="ocr_options.task_config.result_schema",
        )
    return TASK_PROMPTS[task].format(schema=orjson.dumps(schema).decode())
