"""The emulated server's input, output and temp folders, and its file-name rules.

The rules follow what the real server was seen to do in traces 07 and 12: annotated names
(``name.png [input]``), the ``..``/leading-slash checks on ``filename``, the containment
check on ``subfolder``, and ``prefix_00001_.png`` counters for saved images.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FileTypes", "Folders", "SavePath", "ViewRejected"]

FileTypes = ("output", "input", "temp")

_ANNOTATIONS = {"[output]": "output", "[input]": "input", "[temp]": "temp"}


class ViewRejected(Exception):
    """A /view request the server refuses; ``status`` is the HTTP status it answers."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass(frozen=True, slots=True)
class SavePath:
    folder: Path
    filename_base: str
    counter: int
    subfolder: str


@dataclass(frozen=True, slots=True)
class Folders:
    output: Path
    input: Path
    temp: Path

    def by_type(self, file_type: str) -> Path | None:
        return {"output": self.output, "input": self.input, "temp": self.temp}.get(file_type)

    def create(self) -> None:
        for folder in (self.output, self.input, self.temp):
            folder.mkdir(parents=True, exist_ok=True)

    def split_annotation(self, name: str) -> tuple[str, Path | None]:
        """Strip a trailing ``[output]``/``[input]``/``[temp]`` and say which folder it names."""
        for suffix, file_type in _ANNOTATIONS.items():
            if name.endswith(suffix):
                return name[: -len(suffix)].rstrip(" "), self.by_type(file_type)
        return name, None

    def resolve_annotated(self, name: str, default: str = "input") -> Path:
        """Path of an annotated name such as ``sub/pic.png [input]`` (LoadImage's syntax)."""
        bare, folder = self.split_annotation(name)
        base = folder if folder is not None else self.by_type(default)
        assert base is not None
        return base / bare

    def input_files(self) -> list[str]:
        """Files directly in the input folder, sorted, as LoadImage lists them."""
        try:
            return sorted(entry.name for entry in self.input.iterdir() if entry.is_file())
        except FileNotFoundError:
            return []

    def view_path(self, filename: str, file_type: str | None, subfolder: str | None) -> Path:
        """Resolve a /view request to a file, or raise ViewRejected with the server's status.

        ``file_type`` and ``subfolder`` are None when the query string lacks them.
        """
        name, folder = self.split_annotation(filename)
        if not name:
            raise ViewRejected(400)
        if name.startswith("/") or ".." in name:
            raise ViewRejected(400)
        if folder is None:
            folder = self.by_type(file_type if file_type is not None else "output")
        if folder is None:
            raise ViewRejected(400)
        base = os.path.abspath(folder)
        target_dir = base
        if subfolder is not None:
            target_dir = os.path.abspath(os.path.join(base, subfolder))
            if os.path.commonpath((target_dir, base)) != base:
                raise ViewRejected(403)
        path = Path(target_dir) / os.path.basename(name)
        if not path.is_file():
            raise ViewRejected(404)
        return path

    def upload_target(self, folder: Path, subfolder: str, filename: str) -> tuple[Path, Path] | None:
        """Folder and file path for an upload, or None when either escapes ``folder``."""
        base = os.path.abspath(folder)
        target_dir = os.path.join(base, os.path.normpath(subfolder))
        path = os.path.abspath(os.path.join(target_dir, filename))
        if os.path.commonpath((base, path)) != base:
            return None
        return Path(target_dir), Path(path)

    def save_path(self, prefix: str, folder: Path) -> SavePath:
        """Where the next ``prefix_NNNNN_.ext`` file goes, continuing any existing counter.

        Raises:
            ValueError: the prefix points outside ``folder``.
        """
        subfolder = os.path.dirname(os.path.normpath(prefix))
        base_name = os.path.basename(os.path.normpath(prefix))
        target = os.path.abspath(os.path.join(folder, subfolder))
        if os.path.commonpath((os.path.abspath(folder), target)) != os.path.abspath(folder):
            raise ValueError("Saving image outside the output folder is not allowed.")
        pattern = re.compile(re.escape(base_name) + r"_(\d+)_")
        counter = 0
        try:
            for entry in os.listdir(target):
                match = pattern.match(entry)
                if match:
                    counter = max(counter, int(match.group(1)))
        except FileNotFoundError:
            pass
        return SavePath(Path(target), base_name, counter + 1, subfolder)
