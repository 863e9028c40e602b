"""Creating the state files: processes that start at once all end up with one queue file."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from manta_async.queue.batchqueue import BatchQueue

_OPEN_AND_PUT = """
import asyncio, sys
from pathlib import Path
from manta_async.queue.batchqueue import BatchQueue

async def main() -> None:
    async with BatchQueue(Path(sys.argv[1]), drain=False) as queue:
        await queue.call(queue.put, b'{"id": "x", "table": "t", "seq": 1, "changes": []}')

asyncio.run(main())
"""


async def test_processes_creating_the_queue_at_once_share_one_file(tmp_path: Path) -> None:
    for round_no in range(8):
        state = tmp_path / f"state{round_no}"
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _OPEN_AND_PUT,
                str(state),
                stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(4)
        ]
        errors = [(await p.communicate())[1].decode() for p in processes]
        assert [p.returncode for p in processes] == [0] * 4, errors

        # Every process's batch is in the one file left behind, and nothing else is.
        async with BatchQueue(state, drain=False) as queue:
            assert (await queue.call(queue.counts))["pending"] == 4
        assert sorted(p.name for p in (state / "queue").iterdir()) == ["data.db"]
