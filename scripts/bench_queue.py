"""Throughput of the job queue with many tiny jobs, on SQLite and on PostgreSQL.

Enqueues N empty jobs (one transaction each, as the Train page does), then W worker
processes (or threads) claim and finish them as ``osad_core worker`` does: one
transaction to claim, one to finish. Prints jobs/s for both phases and checks that
every job was claimed exactly once.

    python scripts/bench_queue.py --backend sqlite --workers 4
    scripts/pg_tmp.sh run .venv/bin/python scripts/bench_queue.py --backend postgresql --workers 4

PostgreSQL runs in a scratch database on the server of ``OSAD_TEST_POSTGRES_URL``
(dropped afterwards); SQLite in a file in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from db import dispose_engines, init_db, session_scope  # noqa: E402
from db import queries as q  # noqa: E402


def drain(url: str, name: str, start_at: float) -> tuple[list[int], float, float]:
    """Claim and finish jobs until none is queued; returns (job ids, start, end)."""
    time.sleep(max(0.0, start_at - time.time()))
    began = time.time()
    ids = []
    while True:
        with session_scope(url) as s:
            job = q.claim_next_job(s, name)
        if job is None:
            return ids, began, time.time()
        with session_scope(url) as s:
            q.finish_job(s, job.id, "done", worker_id=name)
        ids.append(job.id)


def bench(url: str, n_jobs: int, n_workers: int, mode: str) -> dict:
    init_db(url)
    t0 = time.perf_counter()
    for i in range(n_jobs):
        with session_scope(url) as s:
            q.enqueue_job(s, "score", {"i": i})
    enqueue_s = time.perf_counter() - t0
    dispose_engines()  # no pooled connections may cross into worker processes

    start_at = time.time() + (3.0 if mode == "processes" else 0.2)  # processes need time to import
    pool = (
        ProcessPoolExecutor(n_workers, mp_context=get_context("spawn"))
        if mode == "processes"
        else ThreadPoolExecutor(n_workers)
    )
    with pool:
        futures = [pool.submit(drain, url, f"w{k}", start_at) for k in range(n_workers)]
        results = [f.result() for f in futures]
    # From the first worker's start (a slow process start-up must not count) to the last claim.
    drain_s = max(end for *_, end in results) - min(began for _, began, _ in results)
    ids = [i for got, *_ in results for i in got]
    if len(ids) != n_jobs or len(set(ids)) != n_jobs:
        raise SystemExit(f"FAILED: {len(ids)} claims, {len(set(ids))} distinct, {n_jobs} jobs")
    with session_scope(url) as s:
        statuses = {j.status for j in q.list_jobs(s)}
    if statuses != {"done"}:
        raise SystemExit(f"FAILED: job statuses {statuses}")
    return {
        "enqueue_per_s": n_jobs / enqueue_s,
        "claim_finish_per_s": n_jobs / drain_s,
        "per_worker": [len(got) for got, *_ in results],
    }


def server_settings(url: str) -> str:
    from sqlalchemy import text

    from db import get_engine

    with get_engine(url).connect() as conn:
        version = conn.execute(text("SHOW server_version")).scalar()
        fsync = conn.execute(text("SHOW fsync")).scalar()
        sync = conn.execute(text("SHOW synchronous_commit")).scalar()
    return f"PostgreSQL {version}, fsync={fsync}, synchronous_commit={sync}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["sqlite", "postgresql"], required=True)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--mode", choices=["processes", "threads"], default="processes")
    args = ap.parse_args()

    for n_workers in args.workers:
        scratch = None
        if args.backend == "postgresql":
            from db.scratch import ScratchDatabases

            server = os.environ.get("OSAD_TEST_POSTGRES_URL")
            if not server:
                raise SystemExit("set OSAD_TEST_POSTGRES_URL (scripts/pg_tmp.sh starts a throw-away server)")
            scratch = ScratchDatabases(server, prefix="osad_bench")
            url = scratch.create()
            where = server_settings(url)
            tmp = None
        else:
            tmp = tempfile.TemporaryDirectory()
            url = f"sqlite:///{Path(tmp.name) / 'bench.db'}"
            where = "SQLite (WAL, synchronous=NORMAL)"
        try:
            r = bench(url, args.jobs, n_workers, args.mode)
        finally:
            dispose_engines()
            if scratch is not None:
                scratch.drop(url)
                scratch.close()
            if tmp is not None:
                tmp.cleanup()
        print(
            f"{args.backend:10s} {n_workers} worker {args.mode:9s} {args.jobs} jobs: "
            f"enqueue {r['enqueue_per_s']:7.0f} jobs/s, claim+finish {r['claim_finish_per_s']:7.0f} jobs/s "
            f"(per worker {r['per_worker']}; {where})",
            flush=True,
        )


if __name__ == "__main__":
    main()
