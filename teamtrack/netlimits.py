"""What the servers that face clients (dashboards, the WebSockets gateway) share to bound them:
the key a per-address limit counts by, and the plain HTTP answer of a refused connection."""

from __future__ import annotations

import ipaddress


def address_key(host: str | None) -> str:
    """The per-address key of a client: IPv4 as is, IPv6 by its /64 (one subscriber commonly
    holds a whole /64), an IPv4-mapped IPv6 address as its IPv4."""
    if not host:
        return "?"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def plain_http_response(status: int, reason: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection: for refusing a client before
    any framework has read its request (over a cap, too slow, headers too large)."""
    body = f"{status} {reason}\n".encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body
