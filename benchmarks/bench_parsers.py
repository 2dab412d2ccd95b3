"""CPU cost of the output parsers per generated token (prints numbers; not a test).

Real Qwen text (reasoning, prose, a tool call with long arguments) is tokenized with the real tokenizer,
decoded back by the engine's own ``TextStream`` one token per delta, and fed to the parser chain the
service builds; the figure is process CPU time per token, parsing alone (detokenization measured
apart, as the engine pays it anyway).

    python benchmarks/bench_parsers.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transformers import AutoTokenizer

from qwen_gateway.engines.base import Capabilities
from qwen_gateway.engines.local.detok import TextStream
from qwen_gateway.service.parsers import ParserChoice, parser_for

MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "tiny-qwen3"


class _Decoder:
    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    specials = {str(k): int(v) for k, v in tok.get_added_vocab().items()}
    reasoning = "Let me think about the weather in 杭州 and what the user needs. " * 20
    prose = "Here is the plan: first I check the weather, then I answer. " * 20
    arguments = (
        '{"location": "杭州市", "notes": "' + 'a long note with {braces} and \\"quotes\\" ' * 20 + '"}'
    )
    text = f"<think>\n{reasoning}\n</think>\n\n{prose}\n<tool_call>\n" + (
        f'{{"name": "get_current_weather", "arguments": {arguments}}}\n</tool_call>'
    )
    ids = [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
    by_id = {i: t for t, i in specials.items()}
    stream = TextStream(_Decoder(tok), [], (), by_id)
    pieces = []
    start = time.process_time()
    for i in ids:
        pieces.append((stream.push([i]), stream.last_specials))
    detok = time.process_time() - start
    caps = Capabilities(max_context=4096, special_tokens=specials, tool_format="hermes")
    choice = ParserChoice(thinking=True, tools=True, parallel_tool_calls=True)
    for marks in (True, False):
        start = time.process_time()
        for _ in range(args.repeat):
            chain = parser_for(0, caps, choice)
            for piece, found in pieces:
                chain.feed(piece, found if marks else None)
            chain.finish()
        spent = (time.process_time() - start) / args.repeat
        mode = "token marks" if marks else "text only"
        print(f"parsers ({mode}): {spent / len(ids) * 1e6:.2f} us CPU per token ({len(ids)} tokens)")
    print(f"detokenization (for scale): {detok / len(ids) * 1e6:.2f} us CPU per token")


if __name__ == "__main__":
    main()
