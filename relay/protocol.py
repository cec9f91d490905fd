"""ComfyUI's WebSocket wire format, as observed on a real 0.3.64 server.

Everything here is pure: bytes and dicts in, bytes and dicts out. The facts come from
``shared/comfyui/PROTOCOL.md`` (sections 3 and 5) and the recorded traces.

Text frames are JSON objects ``{"type": ..., "data": ...}``. Binary frames start with a
big-endian u32 event type:

* ``PREVIEW_IMAGE`` (1): ``[u32 1][u32 format][image bytes]``, format 1 = JPEG, 2 = PNG.
* ``TEXT`` (3): ``[u32 3][u32 N][N bytes node id][UTF-8 text]``.
* ``PREVIEW_IMAGE_WITH_METADATA`` (4): ``[u32 4][u32 L][L bytes JSON metadata][image bytes]``.

Type 2 exists in ComfyUI's source but is converted before sending and never reaches the wire.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

__all__ = [
    "MESSAGE_TYPES",
    "PREVIEW_METADATA_KEYS",
    "BinaryEvent",
    "BinaryFrame",
    "ImageFormat",
    "ProtocolError",
    "decode_binary_frame",
    "encode_message",
    "encode_preview",
    "encode_preview_with_metadata",
    "encode_text",
]

_U32 = struct.Struct(">I")
_HEADER = struct.Struct(">II")


class ProtocolError(ValueError):
    """A frame that does not follow the wire format."""


class BinaryEvent(IntEnum):
    """First u32 of a binary frame (PROTOCOL.md §5)."""

    PREVIEW_IMAGE = 1
    TEXT = 3
    PREVIEW_IMAGE_WITH_METADATA = 4


class ImageFormat(IntEnum):
    """Second u32 of a ``PREVIEW_IMAGE`` frame (PROTOCOL.md §5)."""

    JPEG = 1
    PNG = 2

    @property
    def mime(self) -> str:
        return "image/jpeg" if self is ImageFormat.JPEG else "image/png"

    @classmethod
    def from_mime(cls, mime: str) -> ImageFormat:
        if mime == "image/png":
            return cls.PNG
        if mime == "image/jpeg":
            return cls.JPEG
        raise ProtocolError(f"unknown preview image type {mime!r}")


# Keys of the JSON metadata in a PREVIEW_IMAGE_WITH_METADATA frame, in the server's order.
PREVIEW_METADATA_KEYS = (
    "node_id",
    "prompt_id",
    "display_node_id",
    "parent_node_id",
    "real_node_id",
    "image_type",
)

# Every JSON message type the server was seen to send (PROTOCOL.md §3).
MESSAGE_TYPES = frozenset(
    {
        "status",
        "feature_flags",
        "execution_start",
        "execution_cached",
        "executing",
        "progress",
        "progress_state",
        "executed",
        "execution_success",
        "execution_error",
        "execution_interrupted",
        "logs",
    }
)


@dataclass(frozen=True, slots=True)
class BinaryFrame:
    """A decoded binary frame.

    ``image`` and ``mime`` are set for previews, ``metadata`` only for event 4,
    ``node_id`` and ``text`` only for event 3.
    """

    event: BinaryEvent
    image: bytes = b""
    mime: str = ""
    metadata: dict[str, Any] | None = None
    node_id: str = ""
    text: str = ""


def encode_message(message_type: str, data: Any) -> str:
    """Serialize a JSON message the way the server does (Python's default separators)."""
    return json.dumps({"type": message_type, "data": data})


def encode_preview(image: bytes, image_format: ImageFormat) -> bytes:
    """Build a legacy ``PREVIEW_IMAGE`` frame (event 1)."""
    return _HEADER.pack(BinaryEvent.PREVIEW_IMAGE, image_format) + image


def encode_preview_with_metadata(image: bytes, metadata: dict[str, Any]) -> bytes:
    """Build a ``PREVIEW_IMAGE_WITH_METADATA`` frame (event 4).

    The metadata is serialized with Python's default separators, as the server does
    (the recorded frame in ``02b`` has L=166 for a one-character node id).
    """
    meta = json.dumps(metadata).encode()
    return _HEADER.pack(BinaryEvent.PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + image


def encode_text(node_id: str, text: str) -> bytes:
    """Build a ``TEXT`` frame (event 3), the server's ``send_progress_text``."""
    node = node_id.encode()
    return _HEADER.pack(BinaryEvent.TEXT, len(node)) + node + text.encode()


def decode_binary_frame(frame: bytes) -> BinaryFrame:
    """Decode a binary frame from the server.

    Raises:
        ProtocolError: the frame is shorter than its header says or has an unknown event type.
    """
    if len(frame) < _HEADER.size:
        raise ProtocolError(f"binary frame of {len(frame)} bytes is shorter than its header")
    event_code, second = _HEADER.unpack_from(frame)
    try:
        event = BinaryEvent(event_code)
    except ValueError:
        raise ProtocolError(f"unknown binary event type {event_code}") from None
    body = memoryview(frame)[_HEADER.size :]
    if event is BinaryEvent.PREVIEW_IMAGE:
        try:
            image_format = ImageFormat(second)
        except ValueError:
            raise ProtocolError(f"unknown preview image format {second}") from None
        return BinaryFrame(event, image=bytes(body), mime=image_format.mime)
    if len(body) < second:
        raise ProtocolError(f"binary frame declares {second} header bytes but has {len(body)}")
    head, rest = bytes(body[:second]), bytes(body[second:])
    if event is BinaryEvent.TEXT:
        return BinaryFrame(event, node_id=head.decode(errors="replace"), text=rest.decode(errors="replace"))
    try:
        metadata = json.loads(head)
    except ValueError as exc:
        raise ProtocolError("preview metadata is not JSON") from exc
    if not isinstance(metadata, dict):
        raise ProtocolError("preview metadata is not a JSON object")
    mime = metadata.get("image_type")
    return BinaryFrame(event, image=rest, mime=mime if isinstance(mime, str) else "", metadata=metadata)
