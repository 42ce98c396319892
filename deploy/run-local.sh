#!/usr/bin/env bash
# Brings up a whole local ferry stack on this machine and shows files flowing:
# Postgres, RabbitMQ, an OpenSSH sshd (port 2222), an S3 server (s3s-fs on
# 127.0.0.1:9000), dev certificates, a coordinator (https://127.0.0.1:7443) and
# an agent; registers a demo server and watch with ferryctl, drops demo files on
# the SFTP server, and shows them stored in the bucket, announced on AMQP and
# `processed` with their history.
# Idempotent: run it again to restart the processes (state stays in .ferry-dev/).
# Stop everything with: deploy/run-local.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}"
STATE="${FERRY_DEV_DIR:-$ROOT/.ferry-dev}"
BIN="$CARGO_TARGET_DIR/debug"
SSH_PORT="${FERRY_DEV_SSH_PORT:-2222}"
S3_PORT="${FERRY_DEV_S3_PORT:-9000}"
LISTEN="${FERRY_DEV_LISTEN:-127.0.0.1:7443}"
DEMO_DIR=/home/ferrytest/ferry-demo
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

stop_all() {
  for pidfile in "$STATE"/*.pid; do
    [ -e "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
}
if [ "${1:-}" = stop ]; then stop_all; echo "stopped"; exit 0; fi

say "installing / starting dependencies (Postgres, RabbitMQ, sshd, s3s-fs, grpcurl)"
source deploy/toolchain.sh
bash deploy/test-deps.sh
say "building ferry"
cargo build --workspace --bins
mkdir -p "$STATE/logs"
stop_all

say "dev certificates and secret key in $STATE"
CERTS="$STATE/certs"
if [ ! -f "$CERTS/ca.pem" ]; then
  "$BIN/ferryctl" certs init --dir "$CERTS"
  "$BIN/ferryctl" certs issue coordinator --dir "$CERTS" --name coordinator --host localhost --host 127.0.0.1
  "$BIN/ferryctl" certs issue agent --dir "$CERTS" --name demo-agent
  "$BIN/ferryctl" certs issue admin --dir "$CERTS" --name admin
fi
[ -f "$STATE/secret.key" ] || { openssl rand -hex 32 > "$STATE/secret.key"; chmod 600 "$STATE/secret.key"; }

say "database ferry_dev"
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'ferry_dev'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE ferry_dev"

say "sshd on 127.0.0.1:$SSH_PORT (user ferrytest)"
SSHD="$STATE/sshd"
mkdir -p "$SSHD" "$DEMO_DIR/outbox"
chown -R ferrytest: "$DEMO_DIR"
[ -f "$SSHD/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$SSHD/host_ed25519"
cat > "$SSHD/sshd_config" <<CFG
ListenAddress 127.0.0.1
Port $SSH_PORT
HostKey $SSHD/host_ed25519
PidFile $STATE/sshd.pid
PasswordAuthentication yes
PubkeyAuthentication yes
UsePAM no
AllowUsers ferrytest
Subsystem sftp internal-sftp
MaxSessions 64
CFG
/usr/sbin/sshd -f "$SSHD/sshd_config" -E "$STATE/logs/sshd.log"
HOST_KEY=$(ssh-keygen -lf "$SSHD/host_ed25519.pub" | awk '{print $2}')

say "S3 server (s3s-fs) on 127.0.0.1:$S3_PORT, bucket ferry-demo"
mkdir -p "$STATE/s3/ferry-demo"
S3FS=$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")
nohup "$S3FS" --host 127.0.0.1 --port "$S3_PORT" --access-key ferry --secret-key ferry-secret-key "$STATE/s3" \
  > "$STATE/logs/s3.log" 2>&1 &
echo $! > "$STATE/s3.pid"

say "AMQP: exchange ferry-demo, queue ferry-demo-tail"
python3 -c 'import pika' 2>/dev/null || python3 -m pip install -q pika
AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f"
python3 deploy/amqp-tail.py "$AMQP_URL" ferry-demo ferry-demo-tail --declare-only

say "coordinator on $LISTEN"
export FERRY_DATABASE_URL=postgres://postgres@127.0.0.1:5432/ferry_dev
export FERRY_TLS_CA="$CERTS/ca.pem"
FERRY_LISTEN="$LISTEN" FERRY_TLS_CERT="$CERTS/coordinator.pem" FERRY_TLS_KEY="$CERTS/coordinator-key.pem" \
  FERRY_SECRET_KEY_FILE="$STATE/secret.key" FERRY_AMQP_URL="$AMQP_URL" FERRY_AMQP_EXCHANGE=ferry-demo \
  nohup "$BIN/ferry-coordinator" serve > "$STATE/logs/coordinator.out" 2> "$STATE/logs/coordinator.log" &
echo $! > "$STATE/coordinator.pid"
for _ in $(seq 1 50); do grep -q "listening on" "$STATE/logs/coordinator.out" 2>/dev/null && break; sleep 0.2; done
grep -q "listening on" "$STATE/logs/coordinator.out" || { tail -20 "$STATE/logs/coordinator.log"; exit 1; }

say "agent demo-agent"
FERRY_COORDINATORS="https://$LISTEN" FERRY_TLS_CERT="$CERTS/demo-agent.pem" FERRY_TLS_KEY="$CERTS/demo-agent-key.pem" \
  AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ACCESS_KEY_ID=ferry AWS_SECRET_ACCESS_KEY=ferry-secret-key AWS_REGION=us-east-1 \
  nohup "$BIN/ferry-agent" > /dev/null 2> "$STATE/logs/agent.log" &
echo $! > "$STATE/agent.pid"

export FERRY_ENDPOINT="https://$LISTEN" FERRY_TLS_CERT="$CERTS/admin.pem" FERRY_TLS_KEY="$CERTS/admin-key.pem"
ctl() { "$BIN/ferryctl" "$@"; }
say "registering server 'demo' and a watch on $DEMO_DIR/outbox"
if ! ctl servers show demo > /dev/null 2>&1; then
  FERRY_DEMO_PASSWORD=ferrytest-password ctl servers add demo --host 127.0.0.1 --port "$SSH_PORT" \
    --user ferrytest --password-env FERRY_DEMO_PASSWORD --host-key "$HOST_KEY"
  ctl watches add --server demo --dir "$DEMO_DIR/outbox" --glob '*.csv' --interval 2 --bucket ferry-demo
fi

say "dropping demo files"
stamp=$(date +%s)
for i in 1 2 3; do
  printf 'id,value\n%s,%s\n' "$i" "$stamp" > "$DEMO_DIR/outbox/demo-$stamp-$i.csv"
done
chown -R ferrytest: "$DEMO_DIR"

say "waiting for the files to be discovered, stored and announced"
for _ in $(seq 1 60); do
  n=$(ctl --json files list --all --status processed | grep -o "demo-$stamp" | wc -l || true)
  [ "$n" -ge 3 ] && break
  sleep 1
done
ctl servers list
ctl agents
ctl files list
say "objects in the bucket"
find "$STATE/s3/ferry-demo" -type f -name "demo-$stamp-*" -printf '%P  %s bytes\n' | sort
say "AMQP messages"
python3 deploy/amqp-tail.py "$AMQP_URL" ferry-demo ferry-demo-tail --seconds 3
say "history of one file"
first=$(ctl --json files list --all --status processed | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
ctl files show "$first"
cat <<MSG

ferry is running. Try:
  export FERRY_ENDPOINT=$FERRY_ENDPOINT FERRY_TLS_CA=$FERRY_TLS_CA FERRY_TLS_CERT=$FERRY_TLS_CERT FERRY_TLS_KEY=$FERRY_TLS_KEY
  $BIN/ferryctl files list          # or: files show ID, files watch, servers list, agents
  cp some.csv $DEMO_DIR/outbox/ && chown ferrytest: $DEMO_DIR/outbox/some.csv
Logs: $STATE/logs/   Stop: deploy/run-local.sh stop
MSG
