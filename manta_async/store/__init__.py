"""The receiving store: applies each agent's batches at most once and in order, serves rows.

`StoreServer` runs it inside an `async with` block (tests, embedding); `run_store` serves until
SIGTERM or SIGINT (the command line). The HTTP protocol is described in docs/protocol.md.
"""

from manta_async.store.app import StoreServer, run_store

__all__ = ["StoreServer", "run_store"]
