"""The wire-format module against the raw binary frames recorded from the real server."""

from __future__ import annotations

import json

import pytest

from relay.protocol import (
    PREVIEW_METADATA_KEYS,
    BinaryEvent,
    ImageFormat,
    ProtocolError,
    decode_binary_frame,
    encode_message,
    encode_preview,
    encode_preview_with_metadata,
    encode_text,
)
from tests.tracekit import load_trace


def test_decodes_recorded_legacy_jpeg_preview() -> None:
    """Event 1 with format 1 carries JPEG bytes right after the 8-byte header (02 binframe1)."""
    raw = load_trace("02").binframe(1)
    frame = decode_binary_frame(raw)
    assert frame.event is BinaryEvent.PREVIEW_IMAGE
    assert frame.mime == "image/jpeg"
    assert frame.image[:3] == b"\xff\xd8\xff"
    assert encode_preview(frame.image, ImageFormat.JPEG) == raw


def test_decodes_recorded_preview_with_metadata() -> None:
    """Event 4 carries a JSON header of the recorded length and keys, then the image (02b binframe1)."""
    raw = load_trace("02b").binframe(1)
    frame = decode_binary_frame(raw)
    assert frame.event is BinaryEvent.PREVIEW_IMAGE_WITH_METADATA
    assert frame.metadata is not None
    assert tuple(frame.metadata) == PREVIEW_METADATA_KEYS
    assert frame.mime == "image/jpeg"
    assert encode_preview_with_metadata(frame.image, frame.metadata) == raw


def test_decodes_recorded_text_frame() -> None:
    """Event 3 is node id length, node id, then the text (02c binframe2)."""
    raw = load_trace("02c").binframe(2)
    frame = decode_binary_frame(raw)
    assert (frame.event, frame.node_id, frame.text) == (BinaryEvent.TEXT, "2", "step 1/3")
    assert encode_text("2", "step 1/3") == raw


def test_decodes_recorded_png_preview() -> None:
    """Event 1 with format 2 is PNG (02c binframe1)."""
    frame = decode_binary_frame(load_trace("02c").binframe(1))
    assert frame.mime == "image/png"
    assert frame.image.startswith(b"\x89PNG")


def test_message_encoding_matches_the_server_bytes() -> None:
    """JSON messages use the server's separators: the recorded frame lengths come out the same."""
    trace = load_trace("01")
    for record in trace.records_of("ws_recv"):
        message = record["json"]
        assert len(encode_message(message["type"], message["data"])) == record["frame_len"]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\x00\x00\x00", "shorter than its header"),
        (b"\x00\x00\x00\x09\x00\x00\x00\x00", "unknown binary event type 9"),
        (b"\x00\x00\x00\x01\x00\x00\x00\x07abc", "unknown preview image format 7"),
        (b"\x00\x00\x00\x04\x00\x00\x00\x10{}", "declares 16 header bytes"),
        (b"\x00\x00\x00\x04\x00\x00\x00\x02[]", "not a JSON object"),
        (b"\x00\x00\x00\x04\x00\x00\x00\x02{x", "not JSON"),
    ],
)
def test_rejects_malformed_frames(frame: bytes, reason: str) -> None:
    """Malformed frames raise ProtocolError saying what is wrong, never another exception."""
    with pytest.raises(ProtocolError, match=reason):
        decode_binary_frame(frame)


def test_metadata_roundtrip_keeps_non_ascii() -> None:
    """Metadata survives encoding and decoding, whatever its characters."""
    metadata = {"node_id": "12", "prompt_id": "p", "display_node_id": "12", "parent_node_id": None,
                "real_node_id": "12", "image_type": "image/png", "note": "얼굴"}  # fmt: skip
    frame = decode_binary_frame(encode_preview_with_metadata(b"\x89PNG", metadata))
    assert frame.metadata == metadata
    assert json.loads(json.dumps(frame.metadata)) == metadata
