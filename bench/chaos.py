"""Chaos trials: prove the delivery guarantee under faults, with numbers.

    python bench/chaos.py --trials 200 --seed 1 --db both
    python bench/chaos.py --trials 500 --kinds kill-random,kill-point,store-kill --db postgres
    python bench/chaos.py --trials 150 --kinds network --db mariadb --json net.json

Each trial drives the real agent and the real store as separate processes on loopback while
a mutator changes the source, injects one kind of fault, lets the system recover with a clean
`run --once`, and audits it (see bench/lab.py). The kinds:

    kill-random   SIGKILL of the agent at a random instant, the source changing meanwhile
    kill-point    SIGKILL at a named crash point (fetched, index-committed, queued, ...)
    store-kill    SIGKILL of the store while a large batch is on its way in
    network       resets before and after the store committed, timeouts, answers cut
                  short, 500/502/503, 429 with Retry-After in seconds and as a date
    store-down    the store stopped for --down-s seconds while a run waits for it
    overlap       cron-like `run --once` next to a running `serve`; two at once: one exits 6
    source-drop   the source ends the agent's session mid-read: that table's run is abandoned
    poison        a batch refused with 400: parked, listed, its table waits, others flow
    disk-full     the state directory on a small tmpfs: a clear error, then a clean recovery
    corrupt       the index or the queue truncated or overwritten: detected at start

A summary table is printed at the end; --json writes the figures for docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lab import Child, Exit, Findings, Lab, integrity  # noqa: E402

READS_BIG = ("start", "overlap", "source-drop", "corrupt")
"""The trials that touch the big table, whose recovery must run it too."""
CRASH_POINTS = ("fetched", "index-committed", "queued", "uploaded", "acked")
NET_FAULTS = (
    ["pass"] * 6
    + ["status:500", "status:502", "status:503", "reset-before", "reset-after", "cut-after"] * 2
    + ["delay:1.5", "retry-after:429:1", "retry-after-date:503:1"]
)
KINDS = ("kill-random", "kill-point", "store-kill", "network", "store-down", "overlap",
         "source-drop", "poison", "disk-full", "corrupt")  # fmt: skip
WEIGHTS = (30, 30, 8, 12, 1, 3, 4, 4, 4, 4)
EXIT_OK, EXIT_PARKED, EXIT_TABLE_FAILED, EXIT_LOCKED = 0, 4, 5, 6

Trial = Callable[[Lab, Findings, "Options"], Awaitable[None]]


class Options:
    def __init__(self, down_s: float, burst: int) -> None:
        self.down_s = down_s
        self.burst = burst


# --- agent kills -------------------------------------------------------------------------------


async def with_mutations(lab: Lab, work: Awaitable[Exit]) -> Exit:
    """Await `work` while the mutator keeps changing the source."""
    stop = asyncio.Event()
    mutating = asyncio.create_task(lab.mutator.run_during(stop))
    try:
        return await work
    finally:
        stop.set()
        await mutating


async def kill_after(lab: Lab, child: Child, delay_s: float) -> Exit:
    await asyncio.sleep(delay_s)
    child.kill()
    return await lab.finish(child)


async def kill_random(lab: Lab, f: Findings, o: Options) -> None:
    await lab.mutator.burst(lab.rng.randint(5, o.burst))
    child = await lab.agent("main", "run", "--once")
    result = await with_mutations(lab, kill_after(lab, child, lab.rng.uniform(0.3, 1.6)))
    f.exit_codes[f"kill-random:{'killed' if result.killed else result.code}"] += 1


async def kill_point(lab: Lab, f: Findings, o: Options) -> None:
    point = f"{lab.rng.choice(CRASH_POINTS)}:{lab.rng.randint(1, 3)}"
    await lab.mutator.burst(lab.rng.randint(40, 40 + o.burst))
    child = await lab.agent("main", "run", "--once", crash_at=point)
    result = await with_mutations(lab, lab.finish(child))
    f.exit_codes[f"kill-point {point}:{'killed' if result.killed else result.code}"] += 1


async def store_kill(lab: Lab, f: Findings, o: Options) -> None:
    # A large batch (every wide row rewritten) through the proxy, so the kill can be timed
    # from the moment the batch request is on its way to the store.
    await lab.mutator.rewrite_wide()
    await lab.mutator.burst(lab.rng.randint(5, o.burst))
    await lab.script([])
    sent = len(await lab.proxy_log())
    # A third of the time the batches are the parts of full resends, which the store swaps in
    # at the last part.
    resync = lab.rng.random() < 1 / 3
    tables = [lab.specs[k].name for k in ("items", "tags", "wide")]
    args = ["resync", *tables] if resync else ["run", "--once"]
    child = await lab.agent("large", *args)
    hit = await until_requests(lab, sent + lab.rng.randint(1, 3), child, timeout_s=20)
    await asyncio.sleep(lab.rng.uniform(0.0, 0.12))
    lab.kill_store()
    await lab.store_gone()
    await asyncio.sleep(lab.rng.uniform(0.0, 1.0))
    await lab.start_store()
    result = await lab.finish(child)
    what = f"{'resync' if resync else 'run'}:{'in flight' if hit else 'idle'}"
    f.exit_codes[f"store-kill {what}:{result.code}"] += 1


async def until_requests(lab: Lab, count: int, child: Child, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and child.running:
        if len(await lab.proxy_log()) >= count:
            return True
        await asyncio.sleep(0.005)
    return False


# --- the network and the store ----------------------------------------------------------------


async def network(lab: Lab, f: Findings, o: Options) -> None:
    await lab.mutator.burst(lab.rng.randint(o.burst, 4 * o.burst))
    actions = [lab.rng.choice(NET_FAULTS) for _ in range(lab.rng.randint(5, 40))]
    await lab.script(actions)
    sent = len(await lab.proxy_log())
    applied = len(lab.store_batches())

    result = await lab.run_once("proxy", timeout_s=300)

    f.proxied_requests += len(await lab.proxy_log()) - sent
    f.network_batches += len(lab.store_batches()) - applied
    f.exit_codes[f"network:{result.code}"] += 1
    if result.code != EXIT_OK:
        f.problem("network", f"exit {result.code}: {last_line(result.stderr)}")


async def store_down(lab: Lab, f: Findings, o: Options) -> None:
    await lab.mutator.burst(lab.rng.randint(5, o.burst))
    lab.kill_store(signal.SIGTERM)
    await lab.store_gone()
    lab.write_config("down", lab.store_url, ["items", "tags", "wide"], batch_rows=40,
                     retry_for_s=o.down_s * 2 + 30)  # fmt: skip
    child = await lab.agent("down", "run", "--once")

    await asyncio.sleep(o.down_s)
    back = time.monotonic()
    await lab.start_store()
    result = await lab.finish(child, timeout_s=o.down_s * 3 + 60)

    f.recovery_s.append(time.monotonic() - back)
    f.exit_codes[f"store-down:{result.code}"] += 1
    if result.code != EXIT_OK:
        f.problem("store-down", f"exit {result.code}: {last_line(result.stderr)}")


# --- locks ------------------------------------------------------------------------------------


async def overlap(lab: Lab, f: Findings, o: Options) -> None:
    serve = await lab.agent("main", "--log-level", "INFO", "serve", "--every", "1s")
    # A cron run that starts first would take the drain lock, and serve would rightly exit 6.
    await serve.started_to("serving: draining")
    for round_no in range(4):
        await lab.mutator.burst(lab.rng.randint(5, o.burst))
        pair = [await lab.agent("big" if round_no % 2 else "main", "run", "--once")
                for _ in range(2 if round_no % 2 else 1)]  # fmt: skip
        for child in pair:
            code = (await lab.finish(child)).code
            f.exit_codes[f"overlap run --once:{code}"] += 1
            if code not in (EXIT_OK, 3, EXIT_LOCKED):
                f.problem("overlap", f"a cron run next to serve exited {code}")

    # Half the time serve is killed mid-work instead of asked to stop.
    stop = lab.rng.choice([signal.SIGTERM, signal.SIGKILL])
    serve.kill(stop)
    result = await lab.finish(serve, timeout_s=60)
    f.exit_codes[f"overlap serve:{'killed' if result.killed else result.code}"] += 1
    if stop == signal.SIGTERM and result.code != EXIT_OK:
        f.problem("overlap", f"serve exited {result.code} on SIGTERM: {last_line(result.stderr)}")


# --- the source -------------------------------------------------------------------------------


async def source_drop(lab: Lab, f: Findings, o: Options) -> None:
    big = lab.specs["big"].name
    before = [b for b in lab.store_batches() if b[1] == big]
    child = await lab.agent("big", "run", "--once")

    killed = 0
    deadline = time.monotonic() + 20
    while not killed and child.running and time.monotonic() < deadline:
        await asyncio.sleep(lab.rng.uniform(0.0, 0.05))
        killed = await lab.source.kill_readers(big)
    result = await lab.finish(child)

    # The session may be ended after its last row, before the read's transaction closed: the
    # read is then whole and the run ends 0. Either way the unchanged table sends nothing.
    after = [b for b in lab.store_batches() if b[1] == big]
    f.exit_codes[f"source-drop:{'dropped' if killed else 'missed'}:{result.code}"] += 1
    if killed and result.code not in (EXIT_TABLE_FAILED, EXIT_OK):
        f.problem("source-drop", f"exit {result.code}, not 5: {last_line(result.stderr)}")
    if after != before:
        f.problem("source-drop", f"{len(after) - len(before)} batches sent from a cut read")


# --- refused batches --------------------------------------------------------------------------


async def poison(lab: Lab, f: Findings, o: Options) -> None:
    # The first batch request meets a 400; it belongs to the items table, first in order.
    for _ in range(12):
        await lab.mutator.insert()
    await lab.mutator.burst(lab.rng.randint(5, o.burst))
    await lab.script(["status:400"])
    items = lab.specs["items"].name

    first = await lab.run_once("proxy")
    listing = await lab.run_cli("proxy", "queue", "list")
    await check_parked(lab, f, first, listing.stdout, items)

    # More changes and a second run: the parked table keeps waiting, the others flow.
    await lab.mutator.burst(lab.rng.randint(5, o.burst))
    second = await lab.run_once("proxy")
    await check_parked(lab, f, second, (await lab.run_cli("proxy", "queue", "list")).stdout, items)

    pqid = parked_id(listing.stdout)
    retried = await lab.run_cli("proxy", "queue", "retry", str(pqid))
    final = await lab.run_once("proxy")
    f.exit_codes[f"poison:{first.code},{second.code},{retried.code},{final.code}"] += 1


async def check_parked(lab: Lab, f: Findings, result: Exit, listing: str, table: str) -> None:
    if result.code != EXIT_PARKED:
        f.problem("poison", f"exit {result.code}, not 4: {last_line(result.stderr)}")
    if "failed" not in listing or "refused" not in listing:
        f.problem("poison", "the parked batch is not shown failed with its reason in queue list")
    for key in ("tags", "wide"):
        spec = lab.specs[key]
        if await lab.source.encoded_rows(spec.select) != await lab.store_rows(spec.name):
            f.problem("poison", f"table {spec.name} did not flow while {table} was parked")
    seqs = lab.queued_seqs(table)
    if seqs != sorted(seqs) or not seqs:
        f.problem("poison", f"the waiting batches of {table} are out of order: {seqs}")


def parked_id(listing: str) -> int:
    for line in listing.splitlines():
        cells = line.replace("│", " ").split()
        if "failed" in cells and cells[0].isdigit():
            return int(cells[0])
    raise RuntimeError(f"no failed batch in 'queue list':\n{listing}")


# --- the state directory ----------------------------------------------------------------------


async def disk_full(lab: Lab, f: Findings, o: Options) -> None:
    mount = lab.work / "state-tmpfs"
    used_kb = disk_usage_kb(lab.state_dir)
    size_kb = used_kb + 4096
    if not mount_tmpfs(mount, size_kb):
        f.exit_codes["disk-full:skipped (mount -t tmpfs refused)"] += 1
        return
    try:
        await full_disk_run(lab, f, o, mount, size_kb)
    finally:
        move_state(lab, lab.work / "state-disk")
        unmount(mount)


async def full_disk_run(lab: Lab, f: Findings, o: Options, mount: Path, size_kb: int) -> None:
    move_state(lab, mount)
    free_kb = lab.rng.choice([0, 16, 64, 256, 1024])
    filler = mount / "filler"
    fill(filler, max(0, size_kb - disk_usage_kb(mount) - free_kb - 64))
    for _ in range(lab.rng.randint(50, 400)):
        await lab.mutator.insert()
    await lab.mutator.burst(o.burst)

    full = await lab.run_once("main")
    f.exit_codes[f"disk-full:{free_kb}KiB free:{full.code}"] += 1
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    f.messages.update(f"disk-full: {line}" for line in lines[-2:])
    if "Traceback" in full.stderr:
        f.problem("disk-full", f"a traceback instead of a one-line error: {lines[-1:]}")
    elif full.code != EXIT_OK and not any("full" in line for line in lines):
        f.problem("disk-full", f"exit {full.code} without saying the disk is full: {lines[-1:]}")
    if lab.index_ahead_of_queue():
        f.problem("disk-full", "the index moved past what was queued")

    # Free space: the filler goes, and the disk grows, since the failed run's files (the
    # outbox, write-ahead logs) may now take more than the filler gave back.
    filler.unlink()
    grow(mount, size_kb * 2 + 16384)
    again = await lab.run_once("main")
    if again.code != EXIT_OK:
        f.problem("disk-full", f"no recovery once space was freed: {last_line(again.stderr)}")


def disk_usage_kb(path: Path) -> int:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total // 1024 + 1


def mount_tmpfs(mount: Path, size_kb: int) -> bool:
    mount.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    return done.returncode == 0


def grow(mount: Path, size_kb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(mount)], check=True)


def unmount(mount: Path) -> None:
    subprocess.run(["umount", str(mount)], check=False)


def fill(path: Path, kb: int) -> None:
    with path.open("wb") as out:
        try:
            for _ in range(kb):
                out.write(b"\0" * 1024)
        except OSError:
            pass


def move_state(lab: Lab, target: Path) -> None:
    """Copy the state directory to `target` and point the lab's state link at it."""
    source = lab.state_dir
    if source == target.resolve():
        return
    for item in target.iterdir():
        if item.name != "filler":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    shutil.copytree(source, target, dirs_exist_ok=True)
    lab.state_link.unlink()
    lab.state_link.symlink_to(target)


async def corrupt(lab: Lab, f: Findings, o: Options) -> None:
    # Damage with batches still waiting in the queue: the case where a lost queue would lose
    # changes unless it is noticed.
    await lab.mutator.burst(lab.rng.randint(5, o.burst))
    await lab.run_once("main")
    await lab.mutator.burst(lab.rng.randint(5, o.burst))
    await lab.run_once("main", "--no-upload")
    backup = lab.work / "state-backup"
    shutil.copytree(lab.state_dir, backup)
    damage = lab.rng.choice([f"{file}:{how}" for file in ("index", "queue")
                             for how in ("truncate", "garbage", "empty")])  # fmt: skip
    target = lab.state_dir / ("index.db" if damage.startswith("index") else "queue/data.db")
    spoil(target, damage.split(":")[1], lab.rng)

    try:
        await damaged_run(lab, f, target, damage)
    finally:
        shutil.rmtree(backup)


async def damaged_run(lab: Lab, f: Findings, target: Path, damage: str) -> None:
    result = await lab.run_once("main")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    f.exit_codes[f"corrupt {damage}:{result.code}"] += 1
    f.messages.update(f"{damage}: {line}" for line in lines[-2:])
    if result.code == EXIT_OK and integrity(target) == "ok":
        return  # the bytes hit free pages or row payloads: SQLite cannot see it, the audit can
    if result.code == EXIT_OK or "Traceback" in result.stderr or len(lines) != 1:
        f.problem("corrupt", f"{damage}: exit {result.code}, not one clear line: {lines[-3:]}")
    elif "move" not in lines[0] or "resync" not in lines[0]:
        f.problem("corrupt", f"{damage}: the message does not say what to do: {lines[0]}")
    await recover_from_damage(lab, f, target)


def spoil(path: Path, how: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if how == "empty":
        data = bytearray()
    elif how == "truncate":
        data = data[: max(4096, len(data) // 2 // 4096 * 4096) - 1000]
    else:
        start = rng.randrange(1, max(2, len(data) // 4096)) * 4096 if len(data) > 4096 else 100
        data[start : start + 2048] = rng.randbytes(2048)
    path.write_bytes(bytes(data))


async def recover_from_damage(lab: Lab, f: Findings, target: Path) -> None:
    """The documented recovery: move the damaged file aside and resync every table."""
    if target.name == "data.db":
        target = target.parent  # the queue is a folder: it goes aside whole
    target.rename(target.parent / f"{target.name}.damaged-{lab.runs}")
    for wal in target.parent.glob(target.name + "-*"):
        wal.unlink()
    lab.new_index(new_queue=target.name == "queue")
    tables = [lab.specs[k].name for k in ("items", "tags", "wide")]
    resync = await lab.run_cli("main", "resync", *tables)
    big = await lab.run_cli("big", "resync", lab.specs["big"].name)
    if resync.code != EXIT_OK or big.code != EXIT_OK:
        f.problem("corrupt", f"resync failed: {last_line(resync.stderr + big.stderr)}")


# --- running trials ---------------------------------------------------------------------------

TRIALS: dict[str, Trial] = {
    "kill-random": kill_random,
    "kill-point": kill_point,
    "store-kill": store_kill,
    "network": network,
    "store-down": store_down,
    "overlap": overlap,
    "source-drop": source_drop,
    "poison": poison,
    "disk-full": disk_full,
    "corrupt": corrupt,
}


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


async def recover(lab: Lab, f: Findings, kind: str) -> None:
    """A clean run with no fault, up to three times; its duration is the recovery time."""
    started = time.monotonic()
    configs = ("main", "big") if kind in READS_BIG else ("main",)
    for config in configs:
        for _attempt in range(3):
            result = await lab.run_once(config)
            if result.code == EXIT_OK:
                break
        else:
            f.problem(kind, f"recovery run ({config}) exited {result.code}: "
                      f"{last_line(result.stderr)}")  # fmt: skip
    f.recovery_s.append(time.monotonic() - started)


async def run_lab(kind: str, kinds: list[str], trials: int, seed: int, o: Options) -> Findings:
    findings = Findings()
    lifetime_s = 600 + trials * 60
    with tempfile.TemporaryDirectory(prefix=f"manta-chaos-{kind}-") as work:
        async with Lab(Path(work), kind, seed, lifetime_s=lifetime_s) as lab:
            await recover(lab, findings, "start")
            findings.recovery_s.clear()
            schedule = pick_kinds(lab.rng, kinds, trials)
            for number, name in enumerate(schedule, start=1):
                await one_trial(lab, findings, name, o)
                if number % 25 == 0:
                    print(f"[{kind}] {number}/{trials} trials, {findings.bad} problems",
                          file=sys.stderr, flush=True)  # fmt: skip
    return findings


def pick_kinds(rng: random.Random, kinds: list[str], trials: int) -> list[str]:
    """Every kind at least once, then the rest drawn by weight."""
    weights = [WEIGHTS[KINDS.index(k)] for k in kinds]
    schedule = list(kinds)[:trials] + rng.choices(kinds, weights, k=max(0, trials - len(kinds)))
    rng.shuffle(schedule)
    return schedule


async def one_trial(lab: Lab, f: Findings, name: str, o: Options) -> None:
    f.trials[name] += 1
    try:
        await TRIALS[name](lab, f, o)
    except Exception as exc:  # a broken trial is a finding, and the next trial still runs
        f.problem(name, f"the trial itself failed: {type(exc).__name__}: {exc}")
    try:
        await recover(lab, f, name)
        await audit(lab, f, name)
    except Exception as exc:
        f.problem(name, f"the audit failed: {type(exc).__name__}: {exc}")


async def audit(lab: Lab, f: Findings, trial: str) -> None:
    await audit_rows(lab, f, trial)
    audit_batches(lab, f, trial)
    for path in (lab.state_dir / "index.db", lab.state_dir / "queue" / "data.db",
                 lab.store_dir / "store.db"):  # fmt: skip
        result = integrity(path)
        if result != "ok":
            f.integrity_failures += 1
            f.problem(trial, f"integrity_check of {path.name}: {result}")


async def audit_rows(lab: Lab, f: Findings, trial: str) -> None:
    for spec in lab.specs.values():
        source = await lab.source.encoded_rows(spec.select)
        store = await lab.store_rows(spec.name)
        if source != store:
            missing = len(set(source) ^ set(store)) + abs(len(source) - len(store))
            f.lost_changes += missing
            f.problem(trial, f"{spec.name}: store differs from source by {missing} rows")
            await lab.run_cli("big" if spec is lab.specs["big"] else "main", "resync", spec.name)


def audit_batches(lab: Lab, f: Findings, trial: str) -> None:
    report = lab.check_batches()
    f.seq_gaps += report.gaps
    f.seq_repeats += report.repeats
    f.double_applied += report.double_applied
    f.unknown_batches += report.unknown
    f.changes_mismatch += report.mismatched
    f.left_in_queue += report.left
    for text in report.notes:
        f.problem(trial, text)
    f.batches_applied, f.changes_applied, f.resent_refused = report.totals
    f.unverified = report.unverified


# --- the summary ------------------------------------------------------------------------------


def merge(into: Findings, other: Findings) -> None:
    into.trials.update(other.trials)
    into.exit_codes.update(other.exit_codes)
    for name in ("lost_changes", "double_applied", "seq_gaps", "seq_repeats", "unknown_batches",
                 "changes_mismatch", "integrity_failures", "left_in_queue", "batches_applied",
                 "changes_applied", "resent_refused", "proxied_requests", "network_batches",
                 "unverified"):  # fmt: skip
        setattr(into, name, getattr(into, name) + getattr(other, name))
    into.recovery_s += other.recovery_s
    into.messages.update(other.messages)
    into.problems += other.problems


def summary(per_db: dict[str, Findings], seconds: float) -> dict[str, object]:
    figures: dict[str, object] = {"seconds": round(seconds, 1)}
    for db, f in per_db.items():
        rec = sorted(f.recovery_s) or [0.0]
        figures[db] = {
            "trials": dict(f.trials),
            "lost changes": f.lost_changes,
            "double applications": f.double_applied,
            "sequence gaps": f.seq_gaps,
            "sequence repeats": f.seq_repeats,
            "unknown batches": f.unknown_batches,
            "batches not seen in the queue": f.unverified,
            "change counts differing": f.changes_mismatch,
            "integrity failures": f.integrity_failures,
            "left in queue": f.left_in_queue,
            "batches applied": f.batches_applied,
            "changes applied": f.changes_applied,
            "resends refused as duplicates": f.resent_refused,
            "batch requests through the proxy": f.proxied_requests,
            "batches applied through network faults": f.network_batches,
            "recovery median s": round(statistics.median(rec), 2),
            "recovery worst s": round(rec[-1], 2),
            "exit codes": dict(sorted(f.exit_codes.items())),
            "messages": dict(f.messages.most_common(20)),
            "problems": f.problems,
        }
    return figures


def print_summary(figures: dict[str, object]) -> None:
    dbs = [k for k in figures if k != "seconds"]
    rows = ["trials", "lost changes", "double applications", "sequence gaps",
            "sequence repeats", "unknown batches", "batches not seen in the queue",
            "change counts differing",
            "integrity failures", "left in queue", "batches applied", "changes applied",
            "resends refused as duplicates", "batch requests through the proxy",
            "batches applied through network faults",
            "recovery median s", "recovery worst s"]  # fmt: skip
    print(f"{'':34}" + "".join(f"{db:>14}" for db in dbs))
    for row in rows:
        cells = []
        for db in dbs:
            value = figures[db][row]  # type: ignore[index]
            cells.append(sum(value.values()) if isinstance(value, dict) else value)
        print(f"{row:34}" + "".join(f"{c!s:>14}" for c in cells))
    for db in dbs:
        trials = figures[db]["trials"]  # type: ignore[index]
        print(f"{db} trials by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(trials.items())))
        for problem in figures[db]["problems"][:30]:  # type: ignore[index]
            print(f"  problem: {problem}")
    print(f"took {figures['seconds']}s")


async def main(args: argparse.Namespace) -> int:
    kinds = args.kinds.split(",") if args.kinds else list(KINDS)
    unknown = [k for k in kinds if k not in TRIALS]
    if unknown:
        raise SystemExit(f"unknown kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    dbs = ["postgres", "mariadb"] if args.db == "both" else [args.db]
    options = Options(args.down_s, args.burst)
    started = time.monotonic()
    results = await asyncio.gather(
        *(run_lab(db, kinds, args.trials, args.seed + i, options) for i, db in enumerate(dbs))
    )
    figures = summary(dict(zip(dbs, results, strict=True)), time.monotonic() - started)
    print_summary(figures)
    if args.json:
        write_json(Path(args.json), figures)
    return 1 if any(f.bad for f in results) else 0


def write_json(path: Path, figures: dict[str, object]) -> None:
    path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per database")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--db", choices=["postgres", "mariadb", "both"], default="both")
    parser.add_argument("--kinds", help=f"comma-separated subset of: {', '.join(KINDS)}")
    parser.add_argument("--down-s", type=float, default=60.0,
                        help="how long the store stays down in store-down trials")  # fmt: skip
    parser.add_argument("--burst", type=int, default=40, help="source changes per trial, about")
    parser.add_argument("--json", help="write the figures to this file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
