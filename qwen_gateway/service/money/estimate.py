"""An upper bound of a request's tokens, known before it runs (what the admission hold is made of).

The service does not tokenize (the engine does, once, when it renders the prompt), so the hold uses a
bound instead of the exact count: Qwen's tokenizers are byte-level BPE, where every ordinary token
stands for at least one UTF-8 byte, so a text has at most as many tokens as bytes. The chat template
adds special tokens and its own text around each message (role headers, a default system prompt, the
tool-calling instructions): :data:`PER_MESSAGE` and :data:`TEMPLATE` bound those. The bound is loose
for English (about 4 bytes per token) — a hold is an upper bound by design, and settlement charges the
exact count — and is what a key's TPM counts while the request runs.

Media (the counts of ``media/tokens.py``, bounded without decoding anything): an image costs at most its
``max_pixels`` in 28x28 blocks plus 2 (28 px is the smaller block, so the larger count), or DashScope's
high-resolution cap when no ``max_pixels`` is given; a video frame at most the per-frame cap plus its
start/end and timestamp text (frames go two to a token group, so this is twice the real bound).
"""

from __future__ import annotations

import orjson

from qwen_gateway.engines.base import GenerationRequest, ImagePart, TextPart, VideoPart
from qwen_gateway.media.tokens import FRAME_TOKENS, MAX_FRAME_TOKENS, MAX_IMAGE_TOKENS_HIGH_RES

# Template tokens around one message: <|im_start|>, the role, newlines, <|im_end|> (Qwen's ChatML is 5).
PER_MESSAGE = 8
# Template text of a whole prompt: the default system prompt ("You are Qwen, created by Alibaba
# Cloud. You are a helpful assistant.", 68 bytes), the assistant header, an empty <think></think>.
TEMPLATE = 128
# The tool-calling instructions Qwen's templates add when tools are offered (about 700 bytes).
TOOLS = 1024
PATCH = 28 * 28
# Tokens of an image without a max_pixels cap: DashScope's high-resolution cap plus start/end.
IMAGE_DEFAULT_MAX = MAX_IMAGE_TOKENS_HIGH_RES + FRAME_TOKENS
# Per video frame: the frame cap, start/end, and Qwen3-VL's "<12.5 seconds>" timestamp text.
VIDEO_FRAME_MAX = MAX_FRAME_TOKENS + FRAME_TOKENS + 16


# Tokens a forced close of the reasoning block ("\\n</think>\\n\\n", 12 bytes) can take beyond the budget: at
# most one per byte (byte-level BPE), rounded up.
THINK_CLOSE_MAX = 16


def completion_tokens_bound(request: GenerationRequest, n: int = 1) -> int:
    """At most how many completion tokens ``n`` choices of ``request`` generate (what is charged).

    Each choice is capped on its own, so ``n`` choices are ``n`` times one: the worst case the hold
    must cover (settlement charges what was generated). While thinking is on, ``max_tokens`` caps the
    answer alone; the reasoning before it is bounded by the thinking budget (the service always sets
    one) plus the forced close of the block, and is charged as completion tokens too."""
    per_choice = request.sampling.max_tokens
    thinking = request.thinking
    if thinking is not None and thinking.enabled:
        per_choice += (thinking.budget or 0) + THINK_CLOSE_MAX
    return n * per_choice


def prompt_tokens_bound(request: GenerationRequest) -> int:
    """At most how many tokens ``request``'s rendered prompt has."""
    total = TEMPLATE + (TOOLS if request.tools else 0)
    for message in request.messages:
        total += PER_MESSAGE + len(message.role)
        content = message.content
        if isinstance(content, str):
            total += len(content.encode("utf-8"))
        else:
            for part in content:
                total += _part_bound(part)
        for text in (message.name, message.tool_call_id, message.reasoning_content):
            if text:
                total += len(text.encode("utf-8"))
        for call in message.tool_calls:
            total += PER_MESSAGE + len(call.id) + len(call.name.encode()) + len(call.arguments.encode())
    for tool in request.tools:
        total += len(orjson.dumps({"n": tool.name, "d": tool.description, "p": dict(tool.parameters)}))
    return total


def _part_bound(part: TextPart | ImagePart | VideoPart) -> int:
    if isinstance(part, TextPart):
        return len(part.text.encode("utf-8"))
    if isinstance(part, ImagePart):
        return _image_bound(part.max_pixels)
    return len(part.frames) * VIDEO_FRAME_MAX


def _image_bound(max_pixels: int | None) -> int:
    if max_pixels is None:
        return IMAGE_DEFAULT_MAX
    return max_pixels // PATCH + FRAME_TOKENS
