"""Server-Sent Events framing (pure)."""

from __future__ import annotations


def frame(data: bytes, event_id: str | None = None) -> bytes:
    """Frame one default `message` event; `data` must hold no CR or LF."""
    if event_id is None:
        return b"data: " + data + b"\n\n"
    return b"id: " + event_id.encode() + b"\ndata: " + data + b"\n\n"


def retry(milliseconds: int) -> bytes:
    """Frame the reconnection delay hint for `EventSource`."""
    return b"retry: %d\n\n" % milliseconds


def comment(text: str) -> bytes:
    """Frame a comment line, which `EventSource` ignores."""
    return b": " + text.replace("\r", " ").replace("\n", " ").encode() + b"\n\n"


def frame_data(frame: bytes) -> bytes:
    """Return the data field of a frame built by `frame`."""
    start = frame.index(b"data: ") + 6
    return frame[start : frame.index(b"\n", start)]
