"""What the map page is told by the server (`GET /api/config`) and the headers its pages carry.

The tile server is the only other origin a page may talk to, and only for images: the
Content-Security-Policy names its origin and nothing else, so an injected string can neither run
code nor send data anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

DEFAULT_TILE_URL: Final = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
DEFAULT_TILE_ATTRIBUTION: Final = "© OpenStreetMap contributors"

# A host name, where Leaflet's `{s}` (subdomain) may stand for one label; nothing that could
# end or extend a CSP directive (spaces, semicolons, quotes, commas).
_TILE_HOST = re.compile(r"^(\{s\}\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*(:[0-9]{1,5})?$")


def tile_origin(tile_url: str) -> str | None:
    """The CSP source of a tile URL template (`https://*.tile.example.org`); None for ''.

    Raises ValueError with the reason when the template is not a usable http(s) tile URL.
    """
    if not tile_url:
        return None
    parts = urlsplit(tile_url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("the tile URL must start with http:// or https://")
    if not _TILE_HOST.match(parts.netloc):
        raise ValueError("the tile URL's host must be a plain host name (with {s} at most)")
    if not all(f"{{{name}}}" in parts.path + parts.query for name in ("z", "x", "y")):
        raise ValueError("the tile URL must contain {z}, {x} and {y}")
    return f"{parts.scheme}://{parts.netloc.replace('{s}', '*')}"


@dataclass(frozen=True, slots=True)
class PageConfig:
    """Settings the map page needs; served as JSON to signed-in managers."""

    stale_after_s: float = 30.0
    trail_points: int = 20
    tile_url: str = DEFAULT_TILE_URL
    tile_attribution: str = DEFAULT_TILE_ATTRIBUTION

    def __post_init__(self) -> None:
        tile_origin(self.tile_url)

    def document(self) -> dict[str, Any]:
        return {
            "stale_after_s": self.stale_after_s,
            "trail_points": self.trail_points,
            "tile_url": self.tile_url,
            "tile_attribution": self.tile_attribution,
        }

    def security_headers(self) -> dict[str, str]:
        origin = tile_origin(self.tile_url)
        images = "'self' data:" + (f" {origin}" if origin else "")
        return {
            "Content-Security-Policy": (
                f"default-src 'self'; connect-src 'self'; img-src {images}; "
                "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
            # Tile servers may ask for a referrer (OpenStreetMap's policy does): the origin only,
            # never a path. Never "no-referrer": browsers then send `Origin: null` with the
            # page's own forms, which the login and logout CSRF check must refuse.
            "Referrer-Policy": "strict-origin-when-cross-origin" if origin else "same-origin",
            "X-Frame-Options": "DENY",
            "Cache-Control": "no-store",
        }
