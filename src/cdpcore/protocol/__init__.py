"""The replication protocol, free of I/O: frames (`frames.py`) and the two
connection state machines (`connection.py`). Bytes in, frames out, bytes
out; no sockets, files or trio here (docs/protocol.md)."""
from __future__ import annotations

from .connection import ServeConnection, ShipConnection, State
from .errors import ERROR_CODES, ProtocolError
from .frames import (
    DEFAULT_BODY, DEFAULT_FRAME, DEFAULT_INFLIGHT, DEFAULT_OFFER_IDS, DEFAULT_OFFERS, DEFAULT_WINDOW_LOG,
    MAX_FRAME, PROTOCOL_VERSION, SUPPORTED_VERSIONS, Ack, Base, Bye, Data, Error, File, Frame, FrameDecoder,
    Have, Hello, Limits, Need, Offer, Ping, Pong, Position, Prune, PruneSeg, Seal, Segment, SegPos, Welcome,
    decode_payload, encode,
)

__all__ = [
    "ServeConnection", "ShipConnection", "State", "ERROR_CODES", "ProtocolError", "DEFAULT_BODY", "DEFAULT_FRAME", "DEFAULT_INFLIGHT", "DEFAULT_OFFER_IDS",
    "DEFAULT_OFFERS", "DEFAULT_WINDOW_LOG", "MAX_FRAME", "PROTOCOL_VERSION", "SUPPORTED_VERSIONS",
    "Ack", "Base", "Bye", "Data", "Error", "File", "Frame", "FrameDecoder", "Have", "Hello", "Limits",
    "Need", "Offer", "Ping", "Pong", "Position", "Prune", "PruneSeg", "Seal", "Segment", "SegPos",
    "Welcome", "decode_payload", "encode",
]
