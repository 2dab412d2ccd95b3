"""``POST /api/v1/tokenizer``: how a served model splits a request's text into tokens.

DashScope's answer (captures: tokenization-nosse) lists the tokens of the message text itself, with no
chat template around it ("代码改变世界" -> 3 tokens), so that is what is counted here: the text of every
message (its string content, or its ``{"text"}`` parts) joined in order, or the prompt.

Free: the request runs the tokenizer only, never the model, so nothing is held, charged or written to
the usage ledger (the key is still checked). The reference gives no price for DashScope's tokenizer;
charging a count at the input price would make "measure before sending" cost as much as sending.
The body limit (``max_request_bytes``) bounds its work.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from qwen_gateway.engines.base import Tokenizes
from qwen_gateway.errors import InvalidParameter, MissingField
from qwen_gateway.protocol.native import TokenizerRequest
from qwen_gateway.service.models import ModelRegistry
from qwen_gateway.service.requests.native import require_model_and_input
from qwen_gateway.service.validation import ROLE_MESSAGE, UNEXPECTED_ITEM, _is_union_tag, _loc


@dataclass(frozen=True, slots=True)
class Tokenization:
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]


def _text(req: TokenizerRequest) -> str:
    messages, prompt = req.input.messages, req.input.prompt
    if messages is None:
        if not prompt:
            raise MissingField(
                "Required input parameter missing from request.",
                param="input",
                native_code="BadRequest.EmptyInput",
            )
        return prompt
    if not messages:
        raise InvalidParameter(ROLE_MESSAGE, param="input.messages")
    pieces: list[str] = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, str):
            pieces.append(content)
        elif content is not None:
            for j, part in enumerate(content):
                if part.text is None or any(
                    getattr(part, k) is not None for k in ("image", "video", "audio")
                ):
                    # Media tokens depend on the image itself; this endpoint counts text only.
                    raise InvalidParameter(UNEXPECTED_ITEM, param=f"input.messages.{i}.content.{j}")
                pieces.append(part.text)
    return "".join(pieces)


async def tokenize(body: dict[str, Any], models: ModelRegistry) -> Tokenization:
    require_model_and_input(body)
    try:
        req = TokenizerRequest.model_validate(body, strict=True)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = _loc(tuple(p for p in error["loc"] if not _is_union_tag(p)))
        raise InvalidParameter(f"{error['msg']}: {where}", param=where) from None
    served = models.get(req.model)
    text = _text(req)
    engine = served.engine
    if not isinstance(engine, Tokenizes):
        raise InvalidParameter("This model's engine does not offer tokenization.", param="model")
    # Off the event loop: a long text takes the tokenizer a while.
    pairs = await asyncio.to_thread(engine.tokenize, text)
    return Tokenization(tuple(i for i, _ in pairs), tuple(t for _, t in pairs))
