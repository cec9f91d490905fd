"""Texts in more than one language, chosen when an event is serialized.

Step names from a workflow are :class:`Localized`: the translator puts the object in its events,
and each client's channel writes it out in the language of each tab (the relay's configured
language, or the tab's ``?lang=``), serializing an event once per language in use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["LANGUAGES", "Localized", "Text", "picker"]

LANGUAGES = ("ko", "en")


class Localized:
    """A text with a version per language; ``str()`` gives the default language's."""

    __slots__ = ("default", "texts")

    def __init__(self, texts: Mapping[str, str], default: str) -> None:
        self.texts = dict(texts)
        self.default = default if default in self.texts else next(iter(self.texts))

    def pick(self, lang: str | None) -> str:
        return self.texts.get(lang or self.default) or self.texts[self.default]

    def __str__(self) -> str:
        return self.texts[self.default]

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __repr__(self) -> str:
        return f"Localized({self.texts!r}, {self.default!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Localized):
            return self.texts == other.texts and self.default == other.default
        return isinstance(other, str) and str(self) == other

    def __hash__(self) -> int:
        return hash(str(self))


Text = str | Localized


def picker(lang: str | None, seen: list[bool] | None = None) -> Callable[[Any], Any]:
    """An orjson ``default`` writing Localized texts in ``lang``; notes in ``seen`` that one was met."""

    def default(obj: Any) -> Any:
        if isinstance(obj, Localized):
            if seen is not None:
                seen[0] = True
            return obj.pick(lang)
        raise TypeError(f"cannot serialize {type(obj).__name__}")

    return default
