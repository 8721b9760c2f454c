"""Test support: a WAN link emulator for trio (see docs/api.md, "Testing: WAN link emulator").

`Link` holds one direction's parameters (bandwidth, latency, jitter, drops);
`memory_link_pair()` gives two in-memory stream ends joined by a link;
`EmulatedStream.wrap()` shapes a real stream; `LinkProxy` is a TCP proxy
through the link.
"""
from cdpcore.testing.link import Link, parse_bandwidth, parse_duration, parse_size
from cdpcore.testing.proxy import LinkProxy, ProxiedConnection
from cdpcore.testing.stream import EmulatedStream, memory_link_pair, reset_stream

__all__ = [
    "EmulatedStream",
    "Link",
    "LinkProxy",
    "ProxiedConnection",
    "memory_link_pair",
    "parse_bandwidth",
    "parse_duration",
    "parse_size",
    "reset_stream",
]
