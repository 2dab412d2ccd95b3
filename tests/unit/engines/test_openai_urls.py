"""Upstream URLs: credentials masked wherever a URL is shown, and endpoints joined before a query."""

from __future__ import annotations

import pytest

from qwen_gateway.engines.openai.replicas import ReplicaSet
from qwen_gateway.engines.openai.urls import endpoint, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://u:SECRET@host:8000/v1", "http://u:***@host:8000/v1"),
        ("https://TOKEN@host/v1", "https://***@host/v1"),  # a bare userinfo is often the token
        ("http://host/v1?key=SECRET&api-version=2024", "http://host/v1?key=***&api-version=***"),
        ("http://host/v1?SECRET", "http://host/v1?***"),
        ("http://host/v1#SECRET", "http://host/v1#***"),
        ("http://host:8000/v1", "http://host:8000/v1"),
        ("http://[::1/v1", "<unparsable URL>"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "SECRET" not in redact_url(url) and "TOKEN" not in redact_url(url)


def test_a_replica_shows_and_scrubs_its_credentials_and_joins_endpoints_before_the_query() -> None:
    url = "http://u:S%2FECRET@host:1/v1/?key=SECRET2"
    replica = ReplicaSet([url], failures_to_open=3, cooldown=10).replicas[0]
    assert replica.shown == "http://u:***@host:1/v1/?key=***"
    assert replica.chat_url == "http://u:S%2FECRET@host:1/v1/chat/completions?key=SECRET2"
    assert replica.models_url == "http://u:S%2FECRET@host:1/v1/models?key=SECRET2"
    # An exception's text quoting the URL, raw or decoded, loses the secrets.
    message = replica.scrub(f"cannot open {replica.chat_url} (password S/ECRET)")
    assert "SECRET" not in message and "host:1" in message
    assert endpoint("http://host/v1/", "/models") == "http://host/v1/models"


def test_only_credential_like_query_values_are_scrubbed_from_messages() -> None:
    url = "http://host:1/v1?api-version=1&access_token=abc&sid=0123456789abcdef0123"
    replica = ReplicaSet([url], failures_to_open=3, cooldown=10).replicas[0]
    assert replica.shown == "http://host:1/v1?api-version=***&access_token=***&sid=***"
    message = replica.scrub("upstream failed at 10:41 with abc, 0123456789abcdef0123 and 1 retry")
    assert message == "upstream failed at 10:41 with ***, *** and 1 retry"
