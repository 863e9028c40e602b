"""A large table streams: the agent's peak memory does not follow the table's size.

The full measure, 5,000,000 rows on PostgreSQL and MariaDB, is bench/stream_memory.py (many
minutes). Here the same script runs on 60,000 rows of about 200 bytes: a first run, an
unchanged one and a fully read one must each stay under 160 MB of resident memory, where the
agent's own baseline is about 120 MB and holding the rows would add as much again.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "stream_memory.py"
ROWS = 60_000
MAX_RSS_MB = 160


def test_a_large_table_is_read_in_bounded_memory(pg_url: str) -> None:
    args = ["--rows", str(ROWS), "--db", "postgres", "--max-rss-mb", str(MAX_RSS_MB)]

    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "first" in done.stdout and "streamed" in done.stdout
