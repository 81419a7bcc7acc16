#!/usr/bin/env bash
# Start the local stack: Prefect server + UI, MLflow server + UI, the deployments
# of prefect.yaml, a process worker and (when present) the model server.
# Every process is started in its own process group and recorded under
# $SLUICEGATE_HOME/run, so scripts/down.sh stops exactly these and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
BIN=${SLUICEGATE_BIN:-$REPO/.venv/bin}
HOST=127.0.0.1
PREFECT_PORT=${SLUICEGATE_PREFECT_PORT:-4200}
MLFLOW_PORT=${SLUICEGATE_MLFLOW_PORT:-5000}
SERVE_PORT=${SLUICEGATE_SERVE_PORT:-8080}
POOL=sluicegate-process  # the work pool every deployment in prefect.yaml names
export SLUICEGATE_HOME=$(realpath -m "${SLUICEGATE_HOME:-$REPO/.sluicegate}")
RUN=$SLUICEGATE_HOME/run
mkdir -p "$RUN"

# SQLite under SLUICEGATE_HOME by default; Postgres when SLUICEGATE_DATABASE_URL
# (postgresql://user:password@host:5432) is set: databases `prefect` and `mlflow`.
if [ -n "${SLUICEGATE_DATABASE_URL:-}" ]; then
  PREFECT_DB=${SLUICEGATE_DATABASE_URL/postgresql:/postgresql+asyncpg:}/prefect
  MLFLOW_DB=$SLUICEGATE_DATABASE_URL/mlflow
else
  PREFECT_DB=sqlite+aiosqlite:///$SLUICEGATE_HOME/prefect.db
  MLFLOW_DB=sqlite:///$SLUICEGATE_HOME/mlflow.db
fi

export PREFECT_HOME=$SLUICEGATE_HOME/prefect
export PREFECT_API_URL=http://$HOST:$PREFECT_PORT/api
export PREFECT_UI_API_URL=$PREFECT_API_URL
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export SLUICEGATE_MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
export SLUICEGATE_REPO=$REPO

alive() {  # alive NAME: the recorded process is still the one we started
  local pidfile=$RUN/$1.pid
  [ -f "$pidfile" ] || return 1
  read -r pid start < "$pidfile"
  [ -r "/proc/$pid/stat" ] && [ "$(awk '{print $22}' "/proc/$pid/stat")" = "$start" ]
}

start() {  # start NAME COMMAND...: own process group, log and pid file under $RUN
  local name=$1; shift
  setsid "$@" > "$RUN/$name.log" 2>&1 < /dev/null &
  local pid=$!
  echo "$pid $(awk '{print $22}' "/proc/$pid/stat")" > "$RUN/$name.pid"
}

port_busy() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

wait_http() {  # wait_http NAME URL SECONDS
  local i
  for ((i = 0; i < $3; i++)); do
    curl -sf -o /dev/null "$2" && return 0
    alive "$1" || { echo "error: $1 exited; last lines of $RUN/$1.log:" >&2; tail -20 "$RUN/$1.log" >&2; exit 1; }
    sleep 1
  done
  echo "error: $1 did not answer $2 within $3 s; see $RUN/$1.log" >&2
  exit 1
}

if alive prefect-server; then
  echo "the stack is already up for SLUICEGATE_HOME=$SLUICEGATE_HOME (make down stops it)"
else
  for p in "$PREFECT_PORT" "$MLFLOW_PORT"; do
    port_busy "$p" && { echo "error: port $p is in use by something make up did not start" >&2; exit 1; }
  done
  "$BIN/python" -c "from sluicegate.config import Settings, ensure_home; ensure_home(Settings().paths)"
  echo "starting Prefect server on $HOST:$PREFECT_PORT ($PREFECT_DB)"
  PREFECT_API_DATABASE_CONNECTION_URL=$PREFECT_DB \
    start prefect-server "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT"
  echo "starting MLflow server on $HOST:$MLFLOW_PORT ($MLFLOW_DB)"
  start mlflow "$BIN/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "$MLFLOW_DB" --artifacts-destination "$SLUICEGATE_HOME/mlartifacts"
  wait_http prefect-server "$PREFECT_API_URL/health" 120
  wait_http mlflow "http://$HOST:$MLFLOW_PORT/health" 120

  # As Prefect documents it: the work pool first (deploy refuses a pool that does not exist),
  # then every deployment of prefect.yaml, non-interactively.
  if ! "$BIN/prefect" work-pool inspect "$POOL" > /dev/null 2>&1; then
    echo "creating work pool $POOL (process)"
    "$BIN/prefect" work-pool create "$POOL" --type process > "$RUN/work-pool.log" 2>&1 \
      || { echo "error: could not create work pool $POOL:" >&2; tail -20 "$RUN/work-pool.log" >&2; exit 1; }
  fi
  echo "registering deployments: prefect --no-prompt deploy --all (prefect.yaml)"
  "$BIN/prefect" --no-prompt deploy --all > "$RUN/deploy.log" 2>&1 \
    || { echo "error: prefect deploy failed; last lines of $RUN/deploy.log:" >&2; tail -30 "$RUN/deploy.log" >&2; exit 1; }
  echo "starting a worker on pool $POOL"
  start worker "$BIN/prefect" worker start --pool "$POOL" --type process --name "sluicegate-$(hostname)"

  if "$BIN/sluicegate" serve --help > /dev/null 2>&1; then
    echo "starting the model server on $HOST:$SERVE_PORT"
    start serve "$BIN/sluicegate" serve --host "$HOST" --port "$SERVE_PORT"
    sleep 5
    if ! alive serve; then
      echo "note: the model server exited (is there a champion yet? run a pipeline first); see $RUN/serve.log"
      rm -f "$RUN/serve.pid"
    fi
  else
    echo "note: this checkout has no 'sluicegate serve' command; no model server started"
  fi
fi

cat <<MSG

Sluicegate is up (SLUICEGATE_HOME=$SLUICEGATE_HOME):
  Prefect UI:    http://$HOST:$PREFECT_PORT
  MLflow UI:     http://$HOST:$MLFLOW_PORT
  Model server:  http://$HOST:$SERVE_PORT $(alive serve || echo "(not running)")
  Logs:          $RUN/*.log
Start a run: Prefect UI > Deployments > training-pipeline > Run > Custom run, or
  PREFECT_API_URL=$PREFECT_API_URL $BIN/prefect deployment run training-pipeline/training-pipeline
Stop it all: make down
MSG
