"""`python -m manta_async` is the `manta-async` command."""

from manta_async.cli import main

main()
