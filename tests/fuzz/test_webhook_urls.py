"""Webhook URLs against the allow-list: whatever the URL, the relay's check and the HTTP client
that would make the call agree on the host, so no URL passes as an allowed host and reaches
another (a parser difference is the classic way past an allow-list)."""

from __future__ import annotations

import httpx
from hypothesis import example, given
from hypothesis import strategies as st

from relay.webhooks import host_allowed

ALLOWED = ("hooks.example.com", "*.internal.example", "api.example.org:8443")

# Pieces that confuse URL parsers: userinfo, backslashes, encoded and odd separators, dots,
# ports, IPv6 brackets, whitespace and control characters, non-ASCII look-alikes.
pieces = st.sampled_from([
    "http://", "https://", "HTTP://", "ftp://", "//", "\\\\", "@", ":", "%40", "%2e", "%2f", "#", "?", "/",
    "\\", ".", "..", "[", "]", "::1", "127.0.0.1", "localhost", "hooks.example.com", "example.com",
    "internal.example", "a.internal.example", "api.example.org", "8443", "443", "evil.net", "\t", "\n",
    " ", "\x00", "ｅxample.com", "hooks.example.com.", "user:pw", "%00", "0x7f.1",
])  # fmt: skip
noise = st.lists(pieces, max_size=4).map("".join)
# Mostly URLs built around an allowed host (so that many pass the check and the property has
# something to hold), the rest anything the pieces make.
urls = st.one_of(
    st.tuples(
        st.sampled_from(["http://", "https://", "HTTP://", "Https://"]),
        noise,
        st.sampled_from(
            ["hooks.example.com", "x.internal.example", "api.example.org:8443", "HOOKS.Example.COM"]
        ),
        noise,
    ).map("".join),
    st.lists(pieces, min_size=1, max_size=10).map("".join),
)


def _client_host(url: str) -> tuple[str, int] | None:
    """Where httpx would connect for ``url``; None when it would not send it at all."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        return None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return None
    return parsed.host.lower().rstrip("."), parsed.port or (443 if parsed.scheme == "https" else 80)


@given(url=urls)
@example(url="http://hooks.example.com@evil.net/")
@example(url="http://evil.net\\@hooks.example.com/")
@example(url="http://evil.net#@hooks.example.com/")
@example(url="https://a.internal.example:1/")
def test_an_allowed_url_goes_to_an_allowed_host(url: str) -> None:
    if not host_allowed(url, ALLOWED):
        return
    target = _client_host(url)
    assert target is not None, f"allowed, yet httpx would not send {url!r}"
    host, port = target
    assert (
        host == "hooks.example.com"
        or (host.endswith(".internal.example") and host != "internal.example")
        or (host, port) == ("api.example.org", 8443)
    ), f"{url!r} passed the allow-list but httpx would call {host}:{port}"
