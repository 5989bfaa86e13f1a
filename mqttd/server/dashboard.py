"""The dashboard's files: one HTML page, its script, its style sheet and icon, shipped as
package data (``mqttd/server/static/``) and served as they are by the operations listener.

No build step and nothing fetched from elsewhere: the page works offline. Its content
security policy allows only this origin (no inline script or style); the page reads the
JSON API every 2 s and sends the API token, which the operator types in, on its requests.
"""

from __future__ import annotations

import functools
import importlib.resources

HTML = "text/html; charset=utf-8"
JAVASCRIPT = "text/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"
SVG = "image/svg+xml"
ASSETS = {  # path -> (file under static/, content type)
    "/": ("index.html", HTML),
    "/index.html": ("index.html", HTML),
    "/dashboard.js": ("dashboard.js", JAVASCRIPT),
    "/dashboard.css": ("dashboard.css", CSS),
    "/favicon.svg": ("favicon.svg", SVG),
}
CONTENT_TYPES = frozenset(content_type for _, content_type in ASSETS.values())
SECURITY_HEADERS = (
    ("content-security-policy",
     "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
)


@functools.cache
def asset(path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of one of the dashboard's files, read once."""
    name, content_type = ASSETS[path]
    body = importlib.resources.files("mqttd.server").joinpath("static", name).read_bytes()
    return 200, content_type, body
