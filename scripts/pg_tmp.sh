#!/usr/bin/env bash
# A throw-away PostgreSQL cluster in a temporary folder, for the test suite and benchmarks.
#
#   scripts/pg_tmp.sh run CMD [ARGS...]  start a cluster, run CMD with OSAD_TEST_POSTGRES_URL
#                                        set, stop and delete the cluster when CMD ends
#   eval "$(scripts/pg_tmp.sh start)"    start one; sets OSAD_TEST_POSTGRES_URL and PG_TMP_DIR
#   scripts/pg_tmp.sh stop [DIR]         stop and delete it (default: $PG_TMP_DIR)
#   scripts/pg_tmp.sh bindir             print the folder of initdb/pg_ctl; fails when none
#
# The server listens on a unix socket inside the folder only (no TCP port, so several
# clusters never collide) and trusts local connections as user `osad`. PostgreSQL refuses
# to run as root: as root the server runs as the `postgres` user (or `nobody`).
# Durability is off (fsync, synchronous_commit) because the data is thrown away and the
# tests create a database per test; PG_TMP_DURABLE=1 keeps the defaults (benchmarks).
set -euo pipefail

bindir() {
  local d
  if command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
  fi
  # Debian keeps server binaries out of PATH, one folder per major version: take the newest.
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v initdb)")"
    return 0
  fi
  echo "no PostgreSQL server binaries found (initdb, pg_ctl); e.g. apt-get install postgresql" >&2
  return 1
}

# Run as the server's user: ourselves, or an unprivileged account when we are root.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$OWNER" -- "$@"
  else
    "$@"
  fi
}

owner() {
  if [ "$(id -u)" != 0 ]; then id -un
  elif id postgres >/dev/null 2>&1; then echo postgres
  else echo nobody
  fi
}

start() {
  local bin dir opts
  bin="$(bindir)"
  OWNER="$(owner)"
  dir="$(mktemp -d "${TMPDIR:-/tmp}/osad-pg.XXXXXX")"
  [ "$(id -u)" = 0 ] && chown "$OWNER" "$dir"
  as_owner "$bin/initdb" -D "$dir/data" -U osad --auth=trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; rm -rf "$dir"; return 1; }
  opts="-c listen_addresses='' -c unix_socket_directories='$dir' -c max_connections=200"
  if [ "${PG_TMP_DURABLE:-0}" != 1 ]; then
    opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  fi
  if ! as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -o "$opts" -w -t 60 start >/dev/null; then
    cat "$dir/server.log" >&2 || true
    rm -rf "$dir"
    return 1
  fi
  echo "export PG_TMP_DIR='$dir'"
  echo "export OSAD_TEST_POSTGRES_URL='postgresql+psycopg://osad@/postgres?host=$dir'"
}

stop() {
  local dir="${1:-${PG_TMP_DIR:-}}"
  [ -n "$dir" ] && [ -d "$dir/data" ] || { echo "no cluster at '$dir'" >&2; return 1; }
  OWNER="$(stat -c %U "$dir/data" 2>/dev/null || stat -f %Su "$dir/data")"
  as_owner "$(bindir)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
  rm -rf "$dir"
}

case "${1:-}" in
  bindir) bindir ;;
  start) start ;;
  stop) shift; stop "$@" ;;
  run)
    shift
    [ $# -gt 0 ] || { echo "usage: $0 run CMD [ARGS...]" >&2; exit 2; }
    eval "$(start)"
    trap 'stop "$PG_TMP_DIR"' EXIT
    "$@"
    ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
