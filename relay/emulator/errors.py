"""Failures the emulated server answers the way the real one does."""

from __future__ import annotations

__all__ = ["ServerCrash"]


class ServerCrash(Exception):
    """Input that makes the real server fail with its aiohttp 500 page.

    Observed for: malformed or empty JSON on POST /prompt, /queue and /free; ``prompt``
    given as a string; an upload with ``type=bogus`` or ``image`` as a plain field.
    """
