"""The benchmark runs end to end on a few thousand rows of each database and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_prints_every_step_for_every_database(
    pg_url: str, mysql_url: str, tmp_path: Path
) -> None:
    argv = [sys.executable, str(ROOT / "bench" / "bench.py"), "--rows", "3000",
            "--db", "sqlite,postgres,mariadb", "--work", str(tmp_path)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)

    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for db in ("sqlite", "postgres", "mariadb"):
        steps = [line.split()[1] for line in lines if line.startswith(db)]
        assert steps == ["export", "fetch", "first", "unchanged", "churn"], (db, steps)
        unchanged = [line for line in lines if line.startswith(f"{db} ") and "unchanged" in line]
        assert unchanged[0].split()[-2] == "0", unchanged
    assert "full dump of the table" in done.stdout
