"""Throughput of the consent decision function with a large consent store.

Usage (from the repository root)::

    .venv/bin/python -m bench.run_decide [--patients 100000] [--decisions 200000]
        [--grants 2000] [--threads 1,2] [--database-url URL]

Steps: a throw-away SQLite database (or ``--database-url``, which must point to an
empty database) is migrated; two purposes are created (opt-in with a notice, opt-out);
``--patients`` patients are imported through ``ConsentStore.import_patients_csv``;
``--grants`` consents are recorded through the public API (each its own audited
transaction); then, to give the state table a realistic size, one synthetic decision per
second patient is bulk-inserted into ``consent_event``/``consent_state`` with Core
(a benchmark shortcut: no audit entries for those). Then it times:

* ``decide()`` on one thread and on N threads (one shared ``ConsentStore``), random
  patients, alternating purposes, a few unknown patients mixed in;
* ``decide_many()`` in batches of 500.

Results are printed (decisions/s); nothing is asserted. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert, select

from cli.database import make_engine, make_sessions, upgrade
from consent.decision import Outcome
from consent.models import ConsentEvent, ConsentState, Patient, Purpose
from consent.service import ConsentStore

NOTICE = "Vos images sont partagées avec la plateforme régionale Grand Est.\n"


def _csv(patients: int) -> str:
    out = io.StringIO()
    out.write("issuer,patient_id,birth_name,first_name,birth_date,sex\n")
    rng = random.Random(1)
    start = date(1930, 1, 1)
    for n in range(patients):
        born = start + timedelta(days=rng.randrange(0, 33000))
        out.write(f"CHR-METZ,IPP{n:07d},NOM{n},PRENOM{n % 997},{born.isoformat()},{'FM'[n % 2]}\n")
    return out.getvalue()


def _timed_decide(store: ConsentStore, pks: list[int], purposes: list[str], threads: int) -> float:
    per_thread = len(pks) // threads
    barrier = threading.Barrier(threads + 1)
    outcomes: list[int] = [0] * threads

    def work(index: int) -> None:
        mine = pks[index * per_thread : (index + 1) * per_thread]
        barrier.wait()
        permits = 0
        for i, pk in enumerate(mine):
            if store.decide(pk, purposes[i & 1]).outcome is Outcome.PERMIT:
                permits += 1
        outcomes[index] = permits

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    started = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    return per_thread * threads / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=200_000)
    parser.add_argument("--grants", type=int, default=2_000)
    parser.add_argument("--threads", default="1,2", help="Comma-separated thread counts.")
    parser.add_argument(
        "--database-url", default=None, help="An EMPTY database (default: temp SQLite)."
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cg-bench-decide-") as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'consent.db'}"
        engine = make_engine(url, pool_size=8)
        try:
            upgrade(engine)
            sessions = make_sessions(engine)
            store = ConsentStore(sessions)
            store.add_purpose("regional", "Partage régional", notice_text=NOTICE, actor="bench")
            store.add_purpose("research", "Recherche", model="opt-out", actor="bench")

            started = time.perf_counter()
            report = store.import_patients_csv(_csv(args.patients), actor="bench")
            elapsed = time.perf_counter() - started
            if not report.ok:
                print(f"import failed: {report.problems[0]}", file=sys.stderr)
                return 1
            print(
                f"import: {report.imported} patients in {elapsed:.1f} s "
                f"({report.imported / elapsed:,.0f} patients/s)"
            )

            started = time.perf_counter()
            for n in range(args.grants):
                store.grant(
                    issuer="CHR-METZ",
                    patient_id=f"IPP{n:07d}",
                    purpose="regional",
                    channel="api",
                    actor="bench",
                )
            elapsed = time.perf_counter() - started
            if args.grants:
                print(
                    f"grant: {args.grants} audited events in {elapsed:.1f} s "
                    f"({args.grants / elapsed:,.0f} events/s)"
                )

            pks = list(report.patient_pks)
            with sessions.begin() as session:
                regional = session.scalar(select(Purpose.id).where(Purpose.code == "regional"))
                now = datetime.now(UTC)
                rows = [
                    {
                        "patient_pk": pk,
                        "purpose_pk": regional,
                        "decision": "deny",
                        "status": "active",
                        "action": "refuse",
                        "channel": "api",
                        "recorded_by": "bench",
                        "performed_by": "patient",
                        "recorded_at": now,
                    }
                    for pk in pks[args.grants :: 2]
                ]
                for start in range(0, len(rows), 5000):
                    session.execute(insert(ConsentEvent), rows[start : start + 5000])
                events = session.execute(
                    select(ConsentEvent.id, ConsentEvent.patient_pk).where(
                        ConsentEvent.recorded_by == "bench", ConsentEvent.action == "refuse"
                    )
                ).all()
                state = [
                    {"patient_pk": p, "purpose_pk": regional, "decision": "deny", "event_pk": e}
                    for e, p in events
                ]
                for start in range(0, len(state), 5000):
                    session.execute(insert(ConsentState), state[start : start + 5000])
                total = session.scalar(select(Patient.id).order_by(Patient.id.desc()).limit(1))
            print(
                f"store: {len(pks)} patients, {args.grants + len(state)} consent states "
                f"({engine.dialect.name})"
            )

            rng = random.Random(2)
            sample = [rng.randrange(1, (total or 1) + 50) for _ in range(args.decisions)]
            purposes = ["regional", "research"]
            store.decide(sample[0], "regional")  # warm-up: purpose cache, pool
            for threads in (int(t) for t in args.threads.split(",")):
                rate = _timed_decide(store, sample, purposes, threads)
                print(
                    f"decide(): {rate:,.0f} decisions/s ({threads} thread(s), "
                    f"{args.decisions} decisions)"
                )

            started = time.perf_counter()
            decided = 0
            for start in range(0, len(sample), 500):
                decided += len(store.decide_many(sample[start : start + 500], "regional"))
            elapsed = time.perf_counter() - started
            print(f"decide_many(): {decided / elapsed:,.0f} decisions/s (batches of 500)")
        finally:
            engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
