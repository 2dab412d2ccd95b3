"""Web search for ``enable_search``: which ``search_options`` are honoured, when a search runs, and
what the model sees of its results.

DashScope's model decides by itself whether to search. This server does not guess: with a provider
configured (``[search]``), every request with ``enable_search: true`` on a model the catalog allows it
for is searched once, with the text of its last user message as the query (``forced_search`` changes
nothing then; it is honoured by construction). Without a provider, ``enable_search`` is answered
without searching (as DashScope answers when its model decides not to) and ``forced_search: true`` is
a 400: a search that cannot happen is never pretended. A provider failure (timeout, error, garbage) is
logged and the request is answered without results, never failed.

The results go into the prompt as a block of the system message (added when the request has none),
each under its citation marker (``citation_format``: ``[<number>]`` or ``[ref_<number>]``); with
``enable_citation`` the model is asked to cite them with those markers. The block is prompt text, so
its tokens are counted and charged as input like the rest of the prompt. The wording is this server's
own (DashScope's is not published).

``search_options`` (reference §2), each either honoured or refused with a 400 naming it:
``forced_search``, ``enable_source`` (native ``output.search_info``; compatible mode returns no
sources, as DashScope's doesn't), ``enable_citation``, ``citation_format``, ``search_strategy``
(``turbo``/``standard``: ``[search] results`` results, ``max``/``pro``: ``max_results``; the agent
strategies search several rounds and are refused), ``freshness`` (7, 30, 180, 365 days),
``assigned_site_list`` (results only from those sites), ``prepend_search_result`` (native streams:
the results first, in an event of their own; refused elsewhere). ``enable_search_extension``
(vertical "stock"/"weather" tools) and ``intention_options`` are refused when set.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qwen_gateway.engines.base import ChatMessage, TextPart
from qwen_gateway.errors import InvalidParameter
from qwen_gateway.search import SearchFailed, SearchProvider, SearchQuery
from qwen_gateway.service.events import SearchInfo, SearchResult
from qwen_gateway.settings import SearchSettings

if TYPE_CHECKING:
    from qwen_gateway.service.validation import ChatCall

log = logging.getLogger(__name__)

DEFAULT_STRATEGY = "turbo"
# strategy -> uses [search] max_results (else results). "standard"/"pro" are DashScope's older names.
STRATEGIES = {"turbo": False, "standard": False, "max": True, "pro": True}
MULTI_ROUND_STRATEGIES = frozenset({"agent", "agent_max"})
CITATION_FORMATS = ("[<number>]", "[ref_<number>]")
FRESHNESS_DAYS = (7, 30, 180, 365)
MAX_SITES = 25
# Characters of the last user message used as the query (search engines cut long queries anyway).
MAX_QUERY_CHARS = 400
_OPTION = "search_options"


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """``search_options`` as validated (defaults: DashScope's)."""

    forced: bool = False
    enable_source: bool = False
    enable_citation: bool = False
    citation_format: str = CITATION_FORMATS[0]
    strategy: str = DEFAULT_STRATEGY
    freshness: int | None = None
    sites: tuple[str, ...] = ()
    # Native streams only: the results in an event of their own before the answer.
    prepend: bool = False

    def marker(self, number: int) -> str:
        return self.citation_format.replace("<number>", str(number))


def _bool(options: dict[str, Any], name: str) -> bool:
    value = options.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidParameter(f"{_OPTION}.{name} must be a boolean.", param=f"{_OPTION}.{name}")
    return value


def parse_options(raw: Any) -> SearchOptions:
    """``search_options`` -> :class:`SearchOptions`; anything it can't honour is a 400 naming it.

    Checked whether or not ``enable_search`` is on (off, the options are inert, as on DashScope)."""
    if raw is None:
        return SearchOptions()
    if not isinstance(raw, dict):
        raise InvalidParameter(f"{_OPTION} must be an object.", param=_OPTION)
    known = {
        "forced_search",
        "enable_source",
        "enable_citation",
        "citation_format",
        "search_strategy",
        "freshness",
        "assigned_site_list",
        "enable_search_extension",
        "intention_options",
        "prepend_search_result",
    }
    for name in raw:
        if name not in known:
            raise InvalidParameter(f"{_OPTION}.{name} is not a search option.", param=f"{_OPTION}.{name}")
    if _bool(raw, "enable_search_extension"):
        raise InvalidParameter(
            f"{_OPTION}.enable_search_extension is not supported by this server yet.",
            param=f"{_OPTION}.enable_search_extension",
        )
    if raw.get("intention_options") not in (None, {}):
        raise InvalidParameter(
            f"{_OPTION}.intention_options is not supported by this server yet.",
            param=f"{_OPTION}.intention_options",
        )
    citation_format = raw.get("citation_format")
    if citation_format is None:
        citation_format = CITATION_FORMATS[0]
    elif citation_format not in CITATION_FORMATS:
        raise InvalidParameter(
            f"{_OPTION}.citation_format must be one of {', '.join(CITATION_FORMATS)}.",
            param=f"{_OPTION}.citation_format",
        )
    strategy = raw.get("search_strategy")
    if strategy is None:
        strategy = DEFAULT_STRATEGY
    elif not isinstance(strategy, str):  # a list or an object can't be looked up in the tables below
        raise InvalidParameter(
            f"{_OPTION}.search_strategy must be one of {', '.join(STRATEGIES)}.",
            param=f"{_OPTION}.search_strategy",
        )
    elif strategy in MULTI_ROUND_STRATEGIES:
        raise InvalidParameter(
            f"{_OPTION}.search_strategy {strategy!r} (several search rounds) is not supported by this "
            "server: it searches once per request.",
            param=f"{_OPTION}.search_strategy",
        )
    elif strategy not in STRATEGIES:
        raise InvalidParameter(
            f"{_OPTION}.search_strategy must be one of {', '.join(STRATEGIES)}.",
            param=f"{_OPTION}.search_strategy",
        )
    freshness = raw.get("freshness")
    if freshness is not None and (isinstance(freshness, bool) or freshness not in FRESHNESS_DAYS):
        raise InvalidParameter(
            f"{_OPTION}.freshness must be one of {', '.join(map(str, FRESHNESS_DAYS))}.",
            param=f"{_OPTION}.freshness",
        )
    return SearchOptions(
        forced=_bool(raw, "forced_search"),
        enable_source=_bool(raw, "enable_source"),
        enable_citation=_bool(raw, "enable_citation"),
        citation_format=citation_format,
        strategy=strategy,
        freshness=freshness,
        sites=_sites(raw.get("assigned_site_list")),
        prepend=_bool(raw, "prepend_search_result"),
    )


# What prepend_search_result is refused with where it can't have its effect.
PREPEND_MESSAGE = (
    "search_options.prepend_search_result applies to native (DashScope protocol) streams only: the "
    "results come first in an event of their own."
)


_HOST = re.compile(
    r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
)


def _sites(value: Any) -> tuple[str, ...]:
    param = f"{_OPTION}.assigned_site_list"
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_SITES:
        raise InvalidParameter(f"{param} must be a list of at most {MAX_SITES} host names.", param=param)
    sites = []
    for i, site in enumerate(value):
        host = site.strip().lower().rstrip(".") if isinstance(site, str) else ""
        if not _HOST.match(host):
            raise InvalidParameter(
                f"{param}.{i} must be a host name such as example.com.", param=f"{param}.{i}"
            )
        sites.append(host)
    return tuple(dict.fromkeys(sites))


class WebSearch:
    """The operator's provider (or none) and result counts; owned by the gateway, closed with it."""

    def __init__(self, provider: SearchProvider | None, settings: SearchSettings) -> None:
        self._provider = provider
        self._settings = settings

    def startup_line(self) -> str:
        """What the server log says at startup about enable_search."""
        if self._provider is None:
            return (
                "enable_search: no search provider is configured ([search] in the config file); "
                "requests with enable_search are answered without searching, forced_search is refused"
            )
        s = self._settings
        return (
            f"enable_search: web search by {self._provider.name} (timeout {s.timeout:g} s, "
            f"{s.results} results, {s.max_results} for search_strategy max); every enable_search "
            "request on a model that allows it is searched once"
        )

    async def aclose(self) -> None:
        if self._provider is not None:
            await self._provider.aclose()

    def _count(self, options: SearchOptions) -> int:
        return self._settings.max_results if STRATEGIES[options.strategy] else self._settings.results

    def plan(self, call: ChatCall) -> ChatCall:
        """Decide, before admission, whether ``call`` will be searched, and reserve in it
        (``search_reserve``) the most tokens the results can add to its prompt, for the hold. Raises
        only the 400 for ``forced_search`` without a provider. The search itself runs after admission
        (:meth:`apply`): a request refused for its balance, its limits or the engine's capacity costs
        no provider call."""
        if not call.enable_search:
            return call
        if self._provider is None:
            if call.search_options.forced:
                raise InvalidParameter(
                    "search_options.forced_search is not supported: no search provider is configured.",
                    param="search_options.forced_search",
                )
            return call
        messages = call.generation.messages
        if not query_text(messages):
            log.info(
                "request %s: enable_search without user text to search for; not searched", call.request_id
            )
            return call
        reserve = block_bound(
            self._count(call.search_options), has_system=bool(messages) and messages[0].role == "system"
        )
        return dataclasses.replace(call, search_reserve=reserve)

    async def apply(self, call: ChatCall, *, today: dt.date | None = None) -> ChatCall:
        """``call`` with its search run and the results in its prompt (unchanged when :meth:`plan`
        planned none). A provider failure only means no results."""
        if not call.search_reserve or self._provider is None:
            return call
        options = call.search_options
        messages = call.generation.messages
        text = query_text(messages)
        count = self._count(options)
        query = SearchQuery(text, count=count, freshness_days=options.freshness, sites=options.sites)
        try:
            hits = await self._provider.search(query)
        except SearchFailed as exc:
            log.warning(
                "request %s: web search by %s failed (%s); answering without search results",
                call.request_id,
                self._provider.name,
                exc.reason,
            )
            return call
        except Exception:  # a provider's bug must not fail the request either; it is logged in full
            log.exception(
                "request %s: web search by %s raised; answering without search results",
                call.request_id,
                self._provider.name,
            )
            return call
        specials = tuple(call.model.engine.capabilities.special_tokens)
        # What the reserve was made of, whatever the provider answered: at most ``count`` results,
        # each field within its byte bound (a URL past it is not cut into a wrong one: its result goes).
        kept = [h for h in hits if len(inert(h.url, specials).encode()) <= MAX_URL_BYTES][:count]
        results = tuple(
            SearchResult(
                i,
                _clip(inert(h.title, specials), MAX_TITLE_BYTES),
                inert(h.url, specials),
                h.site_name,
                h.icon,
            )
            for i, h in enumerate(kept, start=1)
        )
        snippets = tuple(_clip(inert(h.snippet, specials), MAX_SNIPPET_BYTES) for h in kept)
        if results:
            block = search_block(results, snippets, options, today or dt.datetime.now(dt.UTC).date())
            messages = with_search_block(messages, block)
        info = SearchInfo(results, options.strategy, count=1, enable_source=options.enable_source)
        generation = dataclasses.replace(call.generation, messages=messages)
        return dataclasses.replace(call, generation=generation, search_info=info)


# Bytes of a result's title, URL and snippet put in the prompt (a provider's own caps are smaller:
# SearXNG keeps 200 and 600 characters). They bound what a search adds to the prompt before it runs,
# which the admission hold must cover (block_bound).
MAX_TITLE_BYTES = 800
MAX_URL_BYTES = 1024
MAX_SNIPPET_BYTES = 2400
# The block's own text: its header (with the date), the closing instructions (with two markers), the
# blank line joining it to a system message; and a system message's template tokens when it makes one.
_BLOCK_TEXT_BYTES = 512
_MESSAGE_TOKENS = 16
# Per result, besides its fields: the label ("[ref_12]" / "Result 12:"), "URL: ", line breaks.
_RESULT_TEXT_BYTES = 32


def block_bound(count: int, *, has_system: bool) -> int:
    """At most how many tokens the block of ``count`` results adds to a prompt (one token per byte at
    most: byte-level BPE, as service/money/estimate.py bounds the rest of the prompt)."""
    per_result = _RESULT_TEXT_BYTES + MAX_TITLE_BYTES + MAX_URL_BYTES + MAX_SNIPPET_BYTES
    return _BLOCK_TEXT_BYTES + count * per_result + (0 if has_system else _MESSAGE_TOKENS)


def _clip(text: str, max_bytes: int) -> str:
    raw = text.encode()
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode(errors="ignore")


# Chat-template control tokens of the Qwen family (<|im_start|>, <|im_end|>, <|endoftext|>,
# <|vision_start|>...), removed whatever the engine declares: a remote engine lists none.
_CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>")


def inert(text: str, specials: tuple[str, ...]) -> str:
    """Third-party text made safe to put in the prompt: a web page's title or snippet could hold
    ``<|im_end|>\n<|im_start|>system ...``, which the tokenizer reads as the real control tokens, so a
    page could end the system turn and write one of its own; or a line break and ``URL: ...`` / ``[2]``,
    forging a result of the block. The engine's special-token texts are removed and whitespace runs
    (line breaks included) become one space, so each result stays the lines the block gives it."""
    for special in specials:
        if special:
            text = text.replace(special, " ")
    text = _CONTROL_TOKEN.sub(" ", text)
    return " ".join(text.split())


def query_text(messages: tuple[ChatMessage, ...]) -> str:
    """The search query: the last user message's text, whitespace collapsed, cut to a bound."""
    for message in reversed(messages):
        if message.role == "user":
            return " ".join(message.text().split())[:MAX_QUERY_CHARS].strip()
    return ""


def search_block(
    results: tuple[SearchResult, ...], snippets: tuple[str, ...], options: SearchOptions, today: dt.date
) -> str:
    """The prompt text that gives the model the results, each under its citation marker."""
    lines = [f"Web search results (searched on {today.isoformat()}):", ""]
    for result, snippet in zip(results, snippets, strict=True):
        label = options.marker(result.index) if options.enable_citation else f"Result {result.index}:"
        lines.append(f"{label} {result.title}")
        lines.append(f"URL: {result.url}")
        if snippet:
            lines.append(snippet)
        lines.append("")
    if options.enable_citation:
        lines.append(
            "Use these results where they help answer the user. Right after a statement taken from a "
            f"result, cite it with its marker exactly as written above, e.g. {options.marker(1)}."
        )
    else:
        lines.append("Use these results where they help answer the user; do not write citation markers.")
    return "\n".join(lines)


def with_search_block(messages: tuple[ChatMessage, ...], block: str) -> tuple[ChatMessage, ...]:
    """``block`` appended to the leading system message, or as one when there is none."""
    if messages and messages[0].role == "system":
        first = messages[0]
        content = first.content
        if isinstance(content, str):
            new = f"{content}\n\n{block}" if content else block
            return (dataclasses.replace(first, content=new), *messages[1:])
        return (dataclasses.replace(first, content=(*content, TextPart(f"\n\n{block}"))), *messages[1:])
    return (ChatMessage(role="system", content=block), *messages)
