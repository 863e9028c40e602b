"""A short sample of the chaos trials (bench/chaos.py): every fault kind once per database.

Each trial runs the real agent and store as processes with a fault, lets the system recover
with a clean run, and audits it: no change lost, none applied twice, sequences 1..N, queue
and outbox empty, integrity_check ok. The full-size run and its figures are in
docs/reliability.md.
"""

from __future__ import annotations

import pytest

from bench import chaos

SAMPLE = list(chaos.KINDS)


@pytest.fixture(params=["postgres", "mariadb"])
def kind(request: pytest.FixtureRequest) -> str:
    """The source database, once its test database is known to exist."""
    request.getfixturevalue("pg_url" if request.param == "postgres" else "mysql_url")
    return str(request.param)


async def test_every_fault_kind_keeps_the_delivery_guarantee(kind: str) -> None:
    options = chaos.Options(down_s=2.0, burst=20)

    findings = await chaos.run_lab(kind, SAMPLE, len(SAMPLE), seed=7, o=options)

    assert sorted(findings.trials) == sorted(SAMPLE)
    assert findings.problems == []
    assert findings.bad == 0
    codes = findings.exit_codes
    # The fault really happened where it is meant to, and ended with the documented code.
    assert any(k.startswith("kill-random:") for k in codes)
    assert any(k.startswith("kill-point ") and k.endswith(":killed") for k in codes)
    assert codes["poison:4,4,0,0"] == 1
    # Ended mid-read, the table fails (5); ended after the last row, or after the server sent
    # everything, the read was whole (0). The audit holds either way.
    assert sum(n for k, n in codes.items() if k.startswith("source-drop:")) == 1
    assert codes["overlap run --once:6"] >= 1
    assert codes["overlap serve:0"] + codes["overlap serve:killed"] == 1
    assert codes["store-down:0"] == 1
    assert any(k.startswith("store-kill ") and ":in flight:" in k for k in codes)
    assert not any(k.startswith("disk-full:skipped") for k in codes)
