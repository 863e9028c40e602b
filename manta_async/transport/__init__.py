"""Delivery to the store: the HTTP client (client.py) and the uploader that drains the queue
through it (uploader.py).

`DrainReport` lives here, apart from them, so that a run with nothing to send never loads
aiohttp.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DrainReport:
    """What one drain did, and why it stopped."""

    applied: int = 0
    duplicates: int = 0
    parked: int = 0
    unreachable: str | None = None
    """Set when the store could not be reached within the retry budget."""
    refused: str | None = None
    """Set when the store refused the token or the URL: nothing more can be sent."""
