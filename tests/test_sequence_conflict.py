"""A batch the store refuses with 409 (its copy of the table and the agent's index disagree
on the sequence) is parked with the way out in its reason: resync the table."""

from __future__ import annotations

from manta_async import agent
from manta_async.queue.batchqueue import BatchQueue
from manta_async.store import StoreServer
from tests.conftest import MakeConfig
from tests.dbs import SqliteDb
from tests.test_delivery import Proxy, proxy, source, two_tables  # noqa: F401


async def test_a_sequence_conflict_is_parked_with_resync_in_its_reason(
    proxy: Proxy,  # noqa: F811
    store: StoreServer,
    source: SqliteDb,  # noqa: F811
    make_config: MakeConfig,
) -> None:
    await proxy.script(["status:409"])
    config = two_tables(make_config, proxy.url, source)

    report = await agent.run_once(config, ["a", "b"])

    assert report.exit_code == agent.EXIT_PARKED
    async with BatchQueue(config.state_dir, drain=False) as queue:
        failed = [e for e in await queue.call(queue.entries) if e.status == "failed"]
    assert [(e.table, e.seq) for e in failed] == [("a", 1)]
    assert "manta-async resync a" in (failed[0].reason or "")
