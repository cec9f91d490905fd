"""Which file names and subfolders may be passed on to ComfyUI: those that stay in its folders.

Shared by the proxy (``/view``, uploads) and the workflow library (image parameters), which
must not depend on each other.
"""

from __future__ import annotations

import posixpath

__all__ = ["upstream_safe_name", "upstream_safe_subfolder"]


def _unsafe_characters(name: str) -> bool:
    return "\\" in name or "\x00" in name


def upstream_safe_name(name: str) -> bool:
    """A file name ComfyUI will keep inside its folder (its own rule: no '..', no leading '/')."""
    return not (name.startswith("/") or ".." in name or _unsafe_characters(name))


def upstream_safe_subfolder(subfolder: str) -> bool:
    """A subfolder that stays inside its folder."""
    if not subfolder:
        return True
    normal = posixpath.normpath(subfolder)
    return not (
        subfolder.startswith("/")
        or normal == ".."
        or normal.startswith("../")
        or _unsafe_characters(subfolder)
    )
