#!/usr/bin/env bash
# PostgreSQL and Redis on loopback for the backend integration tests (and CI).
#
#   eval "$(bash scripts/backends.sh start)"   # installs if missing, starts, prints `export ...` lines
#   bash scripts/backends.sh env               # the same export lines, for servers already running
#   bash scripts/backends.sh status
#   bash scripts/backends.sh stop              # stops exactly what `start` started
#
# Both run from Debian's packages, as the `postgres` and `redis` users, on 127.0.0.1 only, on
# non-default ports, with their data under $SLUICEGATE_BACKENDS_DIR (default /var/tmp/sluicegate-backends).
# Passwords are generated once per data dir; stdout carries the export lines, stderr the messages
# (passwords masked), so `eval` in CI keeps them out of the log.
set -euo pipefail

DIR="${SLUICEGATE_BACKENDS_DIR:-/var/tmp/sluicegate-backends}"
PG_PORT="${SLUICEGATE_PG_PORT:-55432}"
REDIS_PORT="${SLUICEGATE_REDIS_PORT:-56379}"
PG_DATA="$DIR/pg/data"
PG_SOCK="$DIR/pg/run"
REDIS_DIR="$DIR/redis"

say() { echo "backends: $*" >&2; }
die() { say "$*"; exit 1; }

pg_bin() {
  # The newest installed server version's binaries (Debian keeps them off PATH).
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$bin" ] && [ -x "$bin/initdb" ] && echo "$bin"
}

as_user() { local user=$1; shift; if [ "$(id -un)" = "$user" ]; then "$@"; else runuser -u "$user" -- "$@"; fi; }

install() {
  local missing=()
  pg_bin >/dev/null || missing+=(postgresql)
  command -v redis-server >/dev/null || missing+=(redis-server)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "need root to install ${missing[*]} (apt-get)"
  say "installing ${missing[*]} from Debian's packages"
  # The packages would start their own servers on the default ports: keep them from doing so.
  local policy=/usr/sbin/policy-rc.d added=""
  # Removed on any exit too: left behind, it would keep every later package from starting its service.
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; added=1; trap "rm -f $policy" EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$added" ]; then rm -f "$policy"; trap - EXIT; fi
  pg_bin >/dev/null && command -v redis-server >/dev/null || die "install failed"
}

secret() {  # one generated password per data dir, readable by root only
  local file="$DIR/$1.password"
  [ -s "$file" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$file")
  cat "$file"
}

pg_running() { [ -d "$PG_DATA" ] && as_user postgres "$(pg_bin)/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

redis_pid() {  # the pid in our pidfile, only if that process is still our redis-server
  local pid
  pid=$(cat "$REDIS_DIR/redis.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && grep -q "redis-server" "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

start_pg() {
  local bin password
  bin=$(pg_bin)
  password=$(secret postgres)
  mkdir -p "$DIR/pg" "$PG_SOCK"
  chmod 755 "$DIR"
  chown postgres:postgres "$DIR/pg" "$PG_SOCK"
  if [ ! -s "$PG_DATA/PG_VERSION" ]; then
    local pwfile="$DIR/pg/.initpw"
    (umask 077; echo "$password" > "$pwfile"); chown postgres "$pwfile"
    # TCP needs the password; the socket (in a folder only postgres and root reach) trusts its user.
    as_user postgres "$bin/initdb" -D "$PG_DATA" -U postgres --pwfile="$pwfile" --auth-host=scram-sha-256 \
      --auth-local=peer --encoding=UTF8 >"$DIR/pg/initdb.log"
    rm -f "$pwfile"
  fi
  if pg_running; then
    say "postgres already running on 127.0.0.1:$PG_PORT"
  else
    as_user postgres "$bin/pg_ctl" -D "$PG_DATA" -l "$DIR/pg/server.log" -w -t 60 start \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_SOCK -c max_connections=200" >/dev/null
    say "postgres started on 127.0.0.1:$PG_PORT (data $PG_DATA)"
  fi
  local psql=(as_user postgres "$bin/psql" -h "$PG_SOCK" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qtA)
  if [ -z "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='sluicegate'")" ]; then
    "${psql[@]}" -c "CREATE ROLE sluicegate LOGIN PASSWORD '$password'" >/dev/null
  fi
  for db in prefect mlflow; do
    if [ -z "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname='$db'")" ]; then
      "${psql[@]}" -c "CREATE DATABASE $db OWNER sluicegate" >/dev/null
    fi
  done
}

start_redis() {
  local password
  password=$(secret redis)
  if redis_pid >/dev/null; then
    say "redis already running on 127.0.0.1:$REDIS_PORT"
    return
  fi
  mkdir -p "$REDIS_DIR"
  chown redis:redis "$REDIS_DIR" 2>/dev/null || true
  # The password goes in a config file, not on the command line (ps shows command lines).
  (umask 077; cat > "$REDIS_DIR/redis.conf" <<EOF
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
requirepass $password
daemonize yes
pidfile $REDIS_DIR/redis.pid
logfile $REDIS_DIR/redis.log
dir $REDIS_DIR
save ""
appendonly no
EOF
  )
  local user=root
  id redis >/dev/null 2>&1 && { chown redis "$REDIS_DIR/redis.conf"; user=redis; }
  as_user "$user" redis-server "$REDIS_DIR/redis.conf"
  for _ in $(seq 100); do
    REDISCLI_AUTH=$password redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break
    sleep 0.1
  done
  redis_pid >/dev/null || die "redis did not start; see $REDIS_DIR/redis.log"
  say "redis started on 127.0.0.1:$REDIS_PORT (data $REDIS_DIR)"
}

print_env() {
  # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; MLflow here runs on psycopg2.
  local pg redis
  pg=$(secret postgres)
  redis=$(secret redis)
  echo "export SLUICEGATE_TEST_PREFECT_DB_URL='postgresql+asyncpg://sluicegate:$pg@127.0.0.1:$PG_PORT/prefect'"
  echo "export SLUICEGATE_TEST_MLFLOW_DB_URL='postgresql+psycopg2://sluicegate:$pg@127.0.0.1:$PG_PORT/mlflow'"
  echo "export SLUICEGATE_TEST_FEAST_REDIS='127.0.0.1:$REDIS_PORT,password=$redis'"
  say "prefect db: postgresql+asyncpg://sluicegate:***@127.0.0.1:$PG_PORT/prefect"
  say "mlflow db:  postgresql+psycopg2://sluicegate:***@127.0.0.1:$PG_PORT/mlflow"
  say "redis:      127.0.0.1:$REDIS_PORT,password=***"
}

stop() {
  if pg_running; then
    as_user postgres "$(pg_bin)/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
    say "postgres stopped"
  fi
  local pid
  if pid=$(redis_pid); then
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    say "redis stopped"
  fi
}

case "${1:-}" in
  start) install; mkdir -p "$DIR"; start_pg; start_redis; print_env ;;
  env) print_env ;;
  status)
    pg_running && say "postgres: running on 127.0.0.1:$PG_PORT" || say "postgres: not running"
    redis_pid >/dev/null && say "redis: running on 127.0.0.1:$REDIS_PORT" || say "redis: not running" ;;
  stop) stop ;;
  *) echo "usage: $0 start|env|status|stop" >&2; exit 2 ;;
esac
