#!/bin/sh
# Demo PKI for deploy/docker-compose.yml, made with the image's own ferryctl
# (no Rust toolchain on the host). Runs as root in the one-shot `cert-init`
# service; idempotent (existing files are kept, so re-running `up` keeps the
# same CA and certificates).
#
#   $CA_DIR   (volume ferry-ca, mounted only here): the CA key and every issued
#             certificate and key, root-only.
#   $OUT_DIR  (volume ferry-certs, mounted read-only by the services): the CA
#             certificate and the issued certificates (0444), their keys and the
#             credential encryption key (0400), owned by $SERVICE_UID, the
#             image's user. The CA key never leaves $CA_DIR.
set -eu

CA_DIR=${CA_DIR:-/ca}
OUT_DIR=${OUT_DIR:-/certs}
SERVICE_UID=${SERVICE_UID:-65534}
SITE=${CERT_SITE:-demo}
# Names clients use for the coordinators: the load balancer (agents, admins),
# each coordinator, and the host side of the published port.
COORDINATOR_HOSTS=${COORDINATOR_HOSTS:-haproxy coordinator-1 coordinator-2 localhost 127.0.0.1}

umask 077
mkdir -p "$CA_DIR" "$OUT_DIR"
chmod 0700 "$CA_DIR"

if [ ! -f "$CA_DIR/ca.pem" ]; then
    ferryctl certs init --dir "$CA_DIR" --common-name "ferry compose demo CA"
fi

# issue KIND NAME [OPTIONS...]: issue DIR/NAME.pem unless it exists.
issue() {
    kind=$1 name=$2
    shift 2
    if [ ! -f "$CA_DIR/$name.pem" ]; then
        ferryctl certs issue "$kind" --dir "$CA_DIR" --name "$name" "$@"
    fi
}

hosts=
for h in $COORDINATOR_HOSTS; do hosts="$hosts --host $h"; done
# shellcheck disable=SC2086 # one word per --host
issue coordinator coordinator $hosts
issue agent agent-1 --site "$SITE"
issue admin admin

if [ ! -f "$CA_DIR/secret.key" ]; then
    # 32 random bytes as 64 hex characters (FERRY_SECRET_KEY_FILE).
    head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' > "$CA_DIR/secret.key"
fi

chown "$SERVICE_UID:$SERVICE_UID" "$OUT_DIR"
chmod 0500 "$OUT_DIR"
for f in ca.pem coordinator.pem agent-1.pem admin.pem; do
    install -m 0444 -o "$SERVICE_UID" -g "$SERVICE_UID" "$CA_DIR/$f" "$OUT_DIR/$f"
done
for f in coordinator-key.pem agent-1-key.pem admin-key.pem secret.key; do
    install -m 0400 -o "$SERVICE_UID" -g "$SERVICE_UID" "$CA_DIR/$f" "$OUT_DIR/$f"
done
echo "cert-init: certificates in $OUT_DIR (owner $SERVICE_UID):"
ls -ln "$OUT_DIR"
