"""Qwen-MT's ``translation_options`` -> the translation prompt a local model answers (both protocols).

DashScope's rules for the translation models (reference §2 ``translation_options``, §3.1): exactly one
user message, no system message, no earlier turns; ``source_lang`` may be ``auto``; languages are named
by their English names (seed 003's list); ``terms`` and ``tm_list`` are lists of ``{"source",
"target"}`` pairs; ``domains`` is an English description of the text's domain and style.

A hosted qwen-mt model takes these options natively; a local checkpoint does not, so the options are
written into the one user message as instructions around the text. The prompt's wording is ours.
Every refusal is a 400 naming the offending field.
"""

from __future__ import annotations

from typing import Any

from qwen_gateway.engines.base import ChatMessage, TextPart
from qwen_gateway.errors import InvalidParameter
from qwen_gateway.service.catalog import ModelSpec

PARAM = "translation_options"
TRANSLATION_FAMILY = "qwen-mt"

# The languages DashScope's translation models name (seed 003's table, English full names); matched
# without regard to case, answered in this spelling.
LANGUAGES = (
    "Chinese",
    "English",
    "Japanese",
    "Korean",
    "Thai",
    "French",
    "German",
    "Spanish",
    "Arabic",
    "Indonesian",
    "Vietnamese",
    "Portuguese",
    "Italian",
    "Dutch",
    "Russian",
    "Khmer",
    "Lao",
    "Burmese",
    "Cebuano",
    "Filipino",
    "Czech",
    "Polish",
    "Persian",
    "Hebrew",
    "Turkish",
    "Hindi",
    "Bengali",
    "Urdu",
)
_BY_NAME = {name.lower(): name for name in LANGUAGES}
AUTO = "auto"
# Keys a translation_options object may hold; anything else is refused, never ignored.
KEYS = frozenset({"source_lang", "target_lang", "terms", "tm_list", "domains"})
# Most term and memory pairs one request may carry: each becomes a prompt line.
MAX_PAIRS = 1000


def _language(options: dict[str, Any], key: str, *, auto: bool) -> str:
    value = options.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidParameter(
            f"{PARAM}.{key} is required and must be a language name.", param=f"{PARAM}.{key}"
        )
    name = value.strip()
    if auto and name.lower() == AUTO:
        return AUTO
    known = _BY_NAME.get(name.lower())
    if known is None:
        raise InvalidParameter(
            f"{PARAM}.{key} is not a supported language: {name[:64]}. "
            f"Use one of: {', '.join(LANGUAGES)}" + (" (or auto)." if auto else "."),
            param=f"{PARAM}.{key}",
        )
    return known


def _pairs(options: dict[str, Any], key: str) -> list[tuple[str, str]]:
    value = options.get(key)
    if value is None:
        return []
    where = f"{PARAM}.{key}"
    if not isinstance(value, list):
        raise InvalidParameter(f'{where} must be a list of {{"source", "target"}} objects.', param=where)
    if len(value) > MAX_PAIRS:
        raise InvalidParameter(f"{where} holds more than {MAX_PAIRS} entries.", param=where)
    out = []
    for i, item in enumerate(value):
        ok = isinstance(item, dict) and set(item) == {"source", "target"}
        if not ok or not all(isinstance(item[k], str) and item[k] for k in ("source", "target")):
            raise InvalidParameter(
                f'{where}.{i} must be an object with non-empty strings "source" and "target" only.',
                param=f"{where}.{i}",
            )
        out.append((item["source"], item["target"]))
    return out


def translation_prompt(text: str, options: dict[str, Any]) -> str:
    """The instructions plus the text to translate, as the one user turn a local model sees."""
    unknown = sorted(set(options) - KEYS)
    if unknown:
        raise InvalidParameter(
            f"{PARAM}.{unknown[0]} is not an option of {PARAM}; it takes {', '.join(sorted(KEYS))}.",
            param=f"{PARAM}.{unknown[0]}",
        )
    source = _language(options, "source_lang", auto=True)
    target = _language(options, "target_lang", auto=False)
    terms = _pairs(options, "terms")
    memory = _pairs(options, "tm_list")
    domains = options.get("domains")
    if domains is not None and (not isinstance(domains, str) or not domains.strip()):
        raise InvalidParameter(f"{PARAM}.domains must be a non-empty string.", param=f"{PARAM}.domains")
    origin = "the text" if source == AUTO else f"the {source} text"
    lines = [f"Translate {origin} below into {target}. Answer with the translation only."]
    if terms:
        lines.append("Always translate these terms as given:")
        lines += [f"{s} -> {t}" for s, t in terms]
    if memory:
        lines.append("Earlier translations to follow in wording and style:")
        lines += [f"{s} -> {t}" for s, t in memory]
    if domains is not None:
        lines.append(f"Domain and style of the text: {domains.strip()}")
    lines += ["", "Text:", text]
    return "\n".join(lines)


def translation_messages(
    messages: tuple[ChatMessage, ...], options: Any, spec: ModelSpec
) -> tuple[ChatMessage, ...]:
    """The conversation a translation request runs as: its one user message rewritten into the prompt."""
    if spec.family != TRANSLATION_FAMILY:
        raise InvalidParameter(
            f"{PARAM} is only supported by the translation models (qwen-mt-plus, qwen-mt-turbo, ...).",
            param=PARAM,
        )
    if not isinstance(options, dict):
        raise InvalidParameter(f"{PARAM} must be an object.", param=PARAM)
    if any(m.role == "system" for m in messages):
        raise InvalidParameter("The translation models do not accept a system message.", param="messages")
    if len(messages) != 1 or messages[0].role != "user":
        raise InvalidParameter(
            "The translation models take exactly one user message (no earlier turns).", param="messages"
        )
    message = messages[0]
    content = message.content
    if not isinstance(content, str):
        if not all(isinstance(p, TextPart) for p in content):
            raise InvalidParameter("The translation models translate text only.", param="messages.0.content")
        content = "".join(p.text for p in content if isinstance(p, TextPart))
    return (ChatMessage(role="user", content=translation_prompt(content, options)),)
