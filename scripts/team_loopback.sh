#!/usr/bin/env bash
# README "For a team (several GPU machines)", step by step, on this machine's loopback:
# a throw-away PostgreSQL, a Ray head and one more Ray node on 127.0.0.1 with Ray's token
# authentication, a client without the token refused, a shared data folder, the first
# admin, one tiny training job queued as the app queues it, run by a worker on the
# cluster; then everything is torn down.
#
#   scripts/team_loopback.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RAY=.venv/bin/ray
PORT=${OSAD_LOOPBACK_RAY_PORT:-6390}
step() { printf '\n== %s\n' "$*"; }

WORK="$(mktemp -d /tmp/osad-team-XXXXXX)"
PIDS=()
cleanup() {
  step "tear down"
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done  # `ray start --block` stops its node
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -n "${PG_TMP_DIR:-}" ] && scripts/pg_tmp.sh stop "$PG_TMP_DIR"
  rm -rf "$WORK"
  echo "stopped the Ray nodes and PostgreSQL, removed $WORK"
}
trap cleanup EXIT

step "PostgreSQL (the shared database)"
eval "$(scripts/pg_tmp.sh start)"
export OSAD_DATABASE_URL="$OSAD_TEST_POSTGRES_URL"
echo "OSAD_DATABASE_URL=$OSAD_DATABASE_URL"

step "shared data folder (on a team: NFS or similar, mounted at the same path everywhere)"
export OSAD_DATA_DIR="$WORK/shared"
mkdir -p "$OSAD_DATA_DIR"
echo "OSAD_DATA_DIR=$OSAD_DATA_DIR"

step "the cluster token (on a team: generated once, copied to each machine, readable by the service user only)"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$WORK/ray_auth_token"
(umask 077; $PY -c "import secrets; print(secrets.token_hex(32))" >"$RAY_AUTH_TOKEN_PATH")
ls -l "$RAY_AUTH_TOKEN_PATH" | awk '{print $1, $NF}'

step "ray start --head (the machine that runs the app; OSAD_DATABASE_URL and OSAD_DATA_DIR are in its environment)"
$RAY start --head --node-ip-address 127.0.0.1 --port "$PORT" --num-cpus 1 --include-dashboard false \
  --temp-dir "$WORK/ray" --block >"$WORK/ray-head.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 60); do grep -q "Ray runtime started" "$WORK/ray-head.log" && break; sleep 1; done
grep -q "Ray runtime started" "$WORK/ray-head.log" || { cat "$WORK/ray-head.log"; exit 1; }
echo "head at 127.0.0.1:$PORT"

step "ray start --address (on each GPU machine, with the token and its own OSAD_DATABASE_URL and OSAD_DATA_DIR; here a second node on the same loopback)"
$RAY start --address "127.0.0.1:$PORT" --node-ip-address 127.0.0.1 --num-cpus 1 --block \
  >"$WORK/ray-node.log" 2>&1 &
PIDS+=($!)
export OSAD_RAY_ADDRESS="127.0.0.1:$PORT"
$PY - <<'PY'
import time, ray
ray.init(address="auto", include_dashboard=False, configure_logging=False, log_to_driver=False)
for _ in range(60):
    if len([n for n in ray.nodes() if n["Alive"]]) >= 2:
        break
    time.sleep(1)
alive = [n for n in ray.nodes() if n["Alive"]]
print(f"{len(alive)} Ray nodes alive, {ray.cluster_resources().get('CPU', 0):g} CPUs")
PY

step "a client without the cluster token, and one with a wrong token, are refused"
mkdir -p "$WORK/stranger"
refused() {  # $1: what the client has; the rest: its environment
  local what=$1; shift
  if env -u RAY_AUTH_TOKEN_PATH -u RAY_AUTH_MODE HOME="$WORK/stranger" "$@" $PY - <<'PY' 2>"$WORK/stranger.log"
import os, ray
try:
    ray.init(address=os.environ["OSAD_RAY_ADDRESS"], include_dashboard=False, configure_logging=False,
             log_to_driver=False)
except ConnectionError:
    raise SystemExit(0)
raise SystemExit("connected")
PY
  then
    echo "refused: a client with $what ($(grep -o -m1 'Authentication token is missing or incorrect' "$WORK/stranger.log"))"
  else
    echo "NOT refused: a client with $what"; exit 1
  fi
}
refused "no token"
echo "not-the-cluster-token" >"$WORK/stranger/token"
refused "a wrong token" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$WORK/stranger/token"

step "the first admin"
echo "loopback-only-$RANDOM$RANDOM" | $PY -m osad_core users add admin --role admin --password-stdin

step "a project and one tiny training job, queued as the Train page queues it"
$PY - <<'PY'
import os
from pathlib import Path

import numpy as np
from PIL import Image

from db import init_db, session_scope
from db import queries as q
from osad_core.data import load_folder
from osad_core.store import image_items

root = Path(os.environ["OSAD_DATA_DIR"]) / "images" / "parts"
rng = np.random.default_rng(0)
for sub, n, value in (("train/good", 8, None), ("test/good", 4, None), ("test/hole", 4, 10)):
    (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.repeat(rng.normal(120, 12, (32, 32, 1)).clip(0, 255), 3, axis=2).astype(np.uint8)
        if value is not None:
            img[8:20, 8:20] = value
        Image.fromarray(img).save(root / sub / f"{i:03d}.png")
init_db()
ds = load_folder(root)
over = {"weights": "random", "backbone": "resnet18", "image_size": 32, "epochs": 2, "steps_per_epoch": 2}
proto = {"setting": "general", "shots": 2, "seed": 0}
with session_scope() as s:
    p = q.create_project(s, "parts", "folder", root_path=str(root))
    q.add_images(s, p.id, image_items(ds.records, ds.root))
    run = q.create_run(s, p.id, "devnet", "tiny", {"overrides": over}, proto, source="app", status="queued",
                       created_by="admin")
    job = q.enqueue_job(s, "train", {"project_id": p.id, "method": "devnet", "preset": "tiny", "overrides": over,
                                     "protocol": proto}, run_id=run.id, created_by="admin")
    print(f"queued job {job.id} (run {run.id})")
PY

step "python -m osad_core worker --once (OSAD_RAY_ADDRESS is set: the job runs as a Ray task)"
t0=$(date +%s)
OMP_NUM_THREADS=1 $PY -m osad_core -v worker --once >"$WORK/worker.log" 2>&1 || { tail -30 "$WORK/worker.log"; exit 1; }
grep -E "worker .* started|job 1 " "$WORK/worker.log" || tail -30 "$WORK/worker.log"
echo "worker finished in $(( $(date +%s) - t0 )) s"

step "the result, as the Results page reads it"
$PY - <<'PY'
from db import session_scope
from db import queries as q

with session_scope() as s:
    job, run = q.get_job(s, 1), q.get_run(s, 1)
    m = q.run_metrics(s, 1)
    print(f"job 1: {job.status}{' (' + job.error + ')' if job.error else ''}; run 1: {run.status}, "
          f"image AUROC {m.get('image_auroc', float('nan')):.3f}, {len(q.run_scores(s, 1))} image scores, "
          f"model {run.model_path}")
    assert job.status == "done" and run.status == "done"
PY
