#!/usr/bin/env bash
# Static checks of what an operator deploys (run by deploy/test.sh after the
# build; needs the built binaries). Idempotent; installs what it needs from
# Debian when missing (docker-compose, haproxy, systemd, python3-yaml).
#
#   deploy/docker-compose.yml       docker-compose config -q; images pinned;
#                                   healthchecks, restart policies, depends_on;
#                                   HAProxy backends = the coordinator services;
#                                   the agent's stop grace > its drain timeout
#   deploy/haproxy/haproxy.cfg      haproxy -c (no warnings but unresolvable
#                                   compose host names)
#   deploy/rabbitmq/definitions.json  parses; the exchange FERRY_AMQP_EXCHANGE
#                                   names is a durable topic exchange; a durable
#                                   queue is bound with a key the routing key
#                                   template matches; the AMQP user and password
#                                   in FERRY_AMQP_URL are defined there
#   deploy/systemd/*.service        systemd-analyze verify (in a temporary root
#                                   holding the units and the built binaries at
#                                   their ExecStart paths; any message fails);
#                                   systemd-analyze security --offline=yes
#                                   below $MAX_EXPOSURE; TimeoutStopSec above
#                                   the agent's drain timeout
#   FERRY_* variables               every one set in the compose file, the env
#                                   examples and the units is read by the binary
#                                   it is given to (from the binaries' --help
#                                   `[env: FERRY_...]`), and each binary gets
#                                   its required options
#   .dockerignore                   keeps target/, .git, .ferry-dev/,
#                                   deploy/certs/ and keys out of the context
#   deploy/grafana/*.json           valid JSON (python3 -m json.tool); every
#                                   ferry_* metric it queries is in README's
#                                   Metrics tables
#
# Binaries: $FERRY_BIN_DIR, else $CARGO_TARGET_DIR/debug.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$PATH:/usr/sbin:/sbin"

log() { printf '[check-deploy] %s\n' "$*"; }
failures=0
fail() {
    printf '[check-deploy] FAIL %s\n' "$*" >&2
    failures=$((failures + 1))
}

# --- tools -------------------------------------------------------------------
missing=()
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v systemd-analyze >/dev/null || missing+=(systemd)
/usr/bin/python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "check-deploy.sh: missing ${missing[*]}; run as root to install them" >&2
        exit 1
    fi
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

BIN=${FERRY_BIN_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}/debug}
for b in ferry-coordinator ferry-agent ferryctl; do
    if [[ ! -x $BIN/$b ]]; then
        echo "check-deploy.sh: $BIN/$b not found; build first (cargo build --workspace --bins) or set FERRY_BIN_DIR" >&2
        exit 1
    fi
done

COMPOSE=deploy/docker-compose.yml
HAPROXY_CFG=deploy/haproxy/haproxy.cfg
UNITS=(deploy/systemd/ferry-coordinator.service deploy/systemd/ferry-agent.service)
MAX_EXPOSURE=${MAX_EXPOSURE:-2.0}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- compose: the tool's own validation -------------------------------------
log "$COMPOSE: docker-compose config"
if docker-compose -f "$COMPOSE" config -q 2>"$tmp/compose.err" \
    && docker-compose -f "$COMPOSE" config >"$tmp/compose.yml" 2>>"$tmp/compose.err"; then
    :
else
    fail "$COMPOSE: docker-compose config rejects it: $(cat "$tmp/compose.err")"
    : >"$tmp/compose.yml"
fi

# --- HAProxy -----------------------------------------------------------------
log "$HAPROXY_CFG: haproxy -c"
if ! haproxy -c -f "$HAPROXY_CFG" >"$tmp/haproxy.out" 2>&1; then
    fail "$HAPROXY_CFG: haproxy -c rejects it: $(grep -E 'ALERT|WARNING' "$tmp/haproxy.out" || cat "$tmp/haproxy.out")"
else
    # The compose service names do not resolve outside the compose network;
    # any other warning is a defect.
    others=$(grep WARNING "$tmp/haproxy.out" | grep -v 'could not resolve address' || true)
    [[ -z $others ]] || fail "$HAPROXY_CFG: haproxy -c warns: $others"
fi

# --- systemd units -----------------------------------------------------------
# verify needs the ExecStart binaries and the system's own units: a temporary
# root with the units in /etc/systemd/system and the built binaries (hard links
# or copies) where ExecStart expects them.
sroot="$tmp/root"
mkdir -p "$sroot/etc/systemd/system" "$sroot/usr/lib/systemd"
cp -r /usr/lib/systemd/system "$sroot/usr/lib/systemd/"
ln -s usr/lib "$sroot/lib"
for unit in "${UNITS[@]}"; do
    name=$(basename "$unit")
    cp "$unit" "$sroot/etc/systemd/system/$name"
    exe=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$unit")
    if [[ -z $exe ]]; then
        fail "$unit: no ExecStart="
        continue
    fi
    built="$BIN/$(basename "$exe")"
    if [[ ! -x $built ]]; then
        fail "$unit: ExecStart=$exe is not one of the ferry binaries"
        continue
    fi
    mkdir -p "$sroot$(dirname "$exe")"
    ln -f "$built" "$sroot$exe" 2>/dev/null || cp "$built" "$sroot$exe"
done
for unit in "${UNITS[@]}"; do
    name=$(basename "$unit")
    log "$unit: systemd-analyze verify, security"
    # verify exits 0 on unknown keys and unparsable values; every message counts.
    out=$(systemd-analyze verify --man=no --root="$sroot" "$name" 2>&1) || true
    [[ -z $out ]] || fail "$unit: systemd-analyze verify: ${out//$sroot/}"
    score=$(cd deploy/systemd && systemd-analyze security --offline=yes "$name" 2>&1 \
        | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\) .*/\1/p')
    if [[ -z $score ]]; then
        fail "$unit: systemd-analyze security --offline=yes gave no exposure score"
    elif awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s > m) }'; then
        fail "$unit: exposure $score is above $MAX_EXPOSURE (systemd-analyze security --offline=yes $unit)"
    else
        log "$unit: exposure $score"
    fi
done

# --- help texts: which FERRY_* variables each binary reads ------------------
# ferryctl: every subcommand's help (certs has its own variables).
ctl_help() { # args...: the subcommand path
    local out sub
    out=$("$BIN/ferryctl" "$@" --help)
    printf '%s\n' "$out"
    [[ $# -lt 3 ]] || return 0
    for sub in $(printf '%s\n' "$out" | awk '/^Commands:/ {on = 1; next} /^$/ {on = 0} on && $1 != "help" {print $1}'); do
        ctl_help "$@" "$sub"
    done
}
"$BIN/ferry-coordinator" serve --help >"$tmp/help.ferry-coordinator"
"$BIN/ferry-agent" --help >"$tmp/help.ferry-agent"
ctl_help >"$tmp/help.ferryctl"

# --- structured checks -------------------------------------------------------
log "FERRY_* variables, RabbitMQ definitions, compose structure, .dockerignore"
if ! /usr/bin/python3 - "$ROOT" "$tmp" "${UNITS[@]}" <<'PY'; then
import base64, hashlib, json, re, sys, urllib.parse
from pathlib import Path
import yaml

root, tmp, units = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
COMPOSE = "deploy/docker-compose.yml"
DEFS = "deploy/rabbitmq/definitions.json"
RABBIT_CONF = "deploy/rabbitmq/rabbitmq.conf"
HAPROXY = "deploy/haproxy/haproxy.cfg"
failed = 0


def fail(where, msg):
    global failed
    failed += 1
    print(f"[check-deploy] FAIL {where}: {msg}", file=sys.stderr)


def parse_help(binary):
    """Env variables a binary reads, and those its required options take."""
    text = (tmp / f"help.{binary}").read_text()
    # `[env: NAME=value]`, or `[env: NAME]` for flags whose values clap hides.
    envs = set(re.findall(r"\[env: (FERRY_[A-Z0-9_]+)[=\]]", text))
    # clap prints each option line, then its description carrying [env: ...].
    flag_env = {}
    for m in re.finditer(r"^\s+(?:-\w, )?--([a-z0-9-]+)[^\n]*\n?(?:[^\n]*?)\[env: (\w+)[=\]]", text, re.M):
        flag_env.setdefault(m.group(1), m.group(2))
    required = set()
    usage = re.search(r"^Usage: .*$", text, re.M)
    if usage:
        for flag in re.findall(r"(?<![\[|])--([a-z0-9-]+) <", usage.group(0)):
            if flag in flag_env:
                required.add(flag_env[flag])
    return envs, required


binaries = {b: parse_help(b) for b in ("ferry-coordinator", "ferry-agent", "ferryctl")}
for b, (envs, _) in binaries.items():
    if not envs:
        fail(f"{b} --help", "no [env: FERRY_...] found; cannot check variables")


def check_env(where, binary, env, check_required=True):
    envs, required = binaries[binary]
    for k in sorted(env):
        if k.startswith("FERRY_") and k not in envs:
            fail(where, f"{k} is not read by {binary} (its --help lists: {', '.join(sorted(envs))})")
    if check_required:
        for k in sorted(required - set(env)):
            fail(where, f"{k} is required by {binary} but not set")


def read_env_file(path):
    env = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            fail(f"{path}:{n}", f"not VAR=value: {line!r}")
            continue
        k, v = line.split("=", 1)
        env[k.strip()] = v.strip()
    return env


# ---- compose -----------------------------------------------------------------
compose_text = (tmp / "compose.yml").read_text()
compose = yaml.safe_load(compose_text) if compose_text.strip() else None
services = (compose or {}).get("services", {})
FERRY_BINS = ("ferry-coordinator", "ferry-agent", "ferryctl")


def cmd(svc):
    c = svc.get("command") or []
    return c.split() if isinstance(c, str) else c


def binary_of(name, svc):
    c = cmd(svc)
    if c and c[0] in FERRY_BINS:
        return c[0]
    return "ferryctl"  # admin toolbox, cert-init: ferryctl is what runs there


def port_of(addr):
    return addr.rsplit(":", 1)[-1]


ferry_services = {n: s for n, s in services.items() if "build" in s or str(s.get("image", "")).startswith("ferry:")}
coordinators = {n: s for n, s in ferry_services.items() if binary_of(n, s) == "ferry-coordinator"}
lb = [n for n, s in services.items() if str(s.get("image", "")).startswith("haproxy:")]
agents = {n: s for n, s in ferry_services.items() if binary_of(n, s) == "ferry-agent"}
if compose is not None:
    if not coordinators:
        fail(COMPOSE, "no service runs ferry-coordinator")
    if not agents:
        fail(COMPOSE, "no service runs ferry-agent")
    for n, s in services.items():
        where = f"{COMPOSE}: service {n}"
        image = str(s.get("image", ""))
        if n not in ferry_services:
            ref = image.rsplit("/", 1)[-1]
            if "@sha256:" not in image and (":" not in ref or ref.endswith(":latest")):
                fail(where, f"image {image!r} is not pinned to a tag")
        restart = str(s.get("restart", ""))
        one_shot = restart == "no"
        if not restart:
            fail(where, "no restart policy (restart: unless-stopped, or \"no\" for one-shot jobs)")
        if not one_shot and "healthcheck" not in s:
            fail(where, "long-running service without a healthcheck")
        for dep, cond in (s.get("depends_on") or {}).items():
            dep_svc = services.get(dep, {})
            c = cond.get("condition") if isinstance(cond, dict) else None
            if str(dep_svc.get("restart", "")) == "no" and c != "service_completed_successfully":
                fail(where, f"depends on one-shot {dep} without condition: service_completed_successfully")
            # The balancer alone starts with any coordinator, healthy or not.
            if "healthcheck" in dep_svc and c != "service_healthy" and not (n in lb and dep in coordinators):
                fail(where, f"depends on {dep} (which has a healthcheck) without condition: service_healthy")
        if n in ferry_services:
            env = s.get("environment") or {}
            check_env(where, binary_of(n, s), env, check_required=n in coordinators or n in agents)
            if not any(v.get("target") == "/certs" if isinstance(v, dict) else str(v).split(":")[1:2] == ["/certs"]
                       for v in s.get("volumes") or []):
                fail(where, "does not mount the certificates at /certs")
    # The agent drains for FERRY_DRAIN_TIMEOUT (default 60 s) on SIGTERM;
    # Docker's default grace is 10 s.
    def secs(v):
        m = re.fullmatch(r"(\d+)(s|m)?", str(v))
        return None if not m else int(m.group(1)) * (60 if m.group(2) == "m" else 1)
    for n, s in agents.items():
        drain = int((s.get("environment") or {}).get("FERRY_DRAIN_TIMEOUT", 60))
        grace = secs(s.get("stop_grace_period", "10s"))
        if grace is None or grace <= drain:
            fail(f"{COMPOSE}: service {n}", f"stop_grace_period {s.get('stop_grace_period', '10s (default)')} is not above FERRY_DRAIN_TIMEOUT {drain}")

# ---- HAProxy backends = the compose coordinators ----------------------------
hap = (root / HAPROXY).read_text()
backend_servers = {}
binds = []
http_frontends = set()
section = None
for line in hap.splitlines():
    words = line.split("#", 1)[0].split()
    if not words:
        continue
    if words[0] in ("global", "defaults", "frontend", "backend", "listen", "resolvers"):
        section = (words[0], words[1] if len(words) > 1 else "")
        continue
    if section and section[0] == "backend" and words[0] == "server" and len(words) >= 3:
        backend_servers[words[1]] = words[2]
    if section and section[0] == "frontend" and words[0] == "bind":
        binds.append((section[1], words[1]))
    if section and section[0] == "frontend" and words[:2] == ["mode", "http"]:
        http_frontends.add(section[1])
    if section and section[0] == "defaults" and words[:2] == ["mode", "http"]:
        fail(HAPROXY, "defaults use mode http: TLS must pass through (mode tcp)")
if "mode tcp" not in hap:
    fail(HAPROXY, "no `mode tcp`: the balancer must pass mTLS through")
if compose is not None:
    for n, s in coordinators.items():
        listen = (s.get("environment") or {}).get("FERRY_LISTEN", "0.0.0.0:7443")
        if not any(a == f"{n}:{port_of(listen)}" for a in backend_servers.values()):
            fail(HAPROXY, f"no backend server {n}:{port_of(listen)} for the compose coordinator {n}")
    for srv, addr in backend_servers.items():
        host = addr.rsplit(":", 1)[0]
        if host not in coordinators:
            fail(HAPROXY, f"server {srv} points at {addr}, which is not a compose service running ferry-coordinator")
    if not lb:
        fail(COMPOSE, "no haproxy service")
    bind_ports = {port_of(b) for f, b in binds if f not in http_frontends}
    for n, s in ferry_services.items():
        env = s.get("environment") or {}
        targets = []
        if "FERRY_COORDINATORS" in env:
            targets = [t.strip() for t in env["FERRY_COORDINATORS"].split(",")]
        elif "FERRY_ENDPOINT" in env:
            targets = [env["FERRY_ENDPOINT"]]
        for t in targets:
            u = urllib.parse.urlsplit(t if "://" in t else "https://" + t)
            if u.hostname not in lb or str(u.port) not in bind_ports:
                fail(f"{COMPOSE}: service {n}", f"{t} is not the balancer ({', '.join(lb)} on {', '.join(sorted(bind_ports))})")

# ---- RabbitMQ definitions ----------------------------------------------------
try:
    defs = json.loads((root / DEFS).read_text())
except (OSError, ValueError) as e:
    fail(DEFS, f"does not parse as JSON: {e}")
    defs = None
if defs is not None and compose is not None:
    exchanges = {(e.get("vhost"), e.get("name")): e for e in defs.get("exchanges", [])}
    queues = {(q.get("vhost"), q.get("name")): q for q in defs.get("queues", [])}
    users = {u.get("name"): u for u in defs.get("users", [])}

    def topic_match(pattern, key):
        def m(p, k):
            if not p:
                return not k
            if p[0] == "#":
                return any(m(p[1:], k[i:]) for i in range(len(k) + 1))
            return bool(k) and (p[0] == "*" or p[0] == k[0]) and m(p[1:], k[1:])
        return m(pattern.split("."), key.split("."))

    for n, s in coordinators.items():
        env = s.get("environment") or {}
        where = f"{DEFS} (for {COMPOSE} service {n})"
        url = env.get("FERRY_AMQP_URL")
        if not url:
            fail(f"{COMPOSE}: service {n}", "FERRY_AMQP_URL is not set: files would stay `uploaded`")
            continue
        u = urllib.parse.urlsplit(url)
        vhost = urllib.parse.unquote(u.path[1:]) if len(u.path) > 1 else "/"
        name = env.get("FERRY_AMQP_EXCHANGE", "ferry")
        ex = exchanges.get((vhost, name))
        if ex is None:
            fail(where, f"no exchange {name!r} in vhost {vhost!r} (FERRY_AMQP_EXCHANGE={name})")
            continue
        if ex.get("type") != "topic" or ex.get("durable") is not True or ex.get("auto_delete") or ex.get("internal") or ex.get("arguments"):
            fail(where, f"exchange {name!r} must be a durable topic exchange without arguments (the coordinator declares it so): {ex}")
        key = env.get("FERRY_AMQP_ROUTING_KEY", "ferry.file.{server}").replace("{server}", "demo")
        bound = [b for b in defs.get("bindings", [])
                 if b.get("source") == name and b.get("vhost") == vhost and b.get("destination_type") == "queue"]
        if not bound:
            fail(where, f"no queue is bound to exchange {name!r}: mandatory publishes come back and files stay `uploaded`")
        routed = [b for b in bound if topic_match(b.get("routing_key", ""), key)]
        if bound and not routed:
            fail(where, f"no binding of {name!r} matches the routing key {key!r} (bindings: {[b.get('routing_key') for b in bound]})")
        for b in routed:
            q = queues.get((vhost, b.get("destination")))
            if q is None:
                fail(where, f"binding to queue {b.get('destination')!r}, which is not defined")
            elif q.get("durable") is not True:
                fail(where, f"queue {b.get('destination')!r} is not durable")
        user = urllib.parse.unquote(u.username or "guest")
        password = urllib.parse.unquote(u.password or "guest")
        if user not in users:
            fail(where, f"FERRY_AMQP_URL user {user!r} is not defined (and guest may only connect from localhost)")
        else:
            d = users[user]
            if d.get("hashing_algorithm") != "rabbit_password_hashing_sha256":
                fail(where, f"user {user!r}: use hashing_algorithm rabbit_password_hashing_sha256")
            else:
                try:
                    raw = base64.b64decode(d.get("password_hash", ""), validate=True)
                except ValueError:
                    raw = b""
                if len(raw) != 36 or hashlib.sha256(raw[:4] + password.encode()).digest() != raw[4:]:
                    fail(where, f"user {user!r}: password_hash does not match the password in FERRY_AMQP_URL")
            if not any(p.get("user") == user and p.get("vhost") == vhost and p.get("write") and p.get("configure")
                       for p in defs.get("permissions", [])):
                fail(where, f"user {user!r} has no configure/write permission on vhost {vhost!r}")
    # The broker and the balancer must read the checked files.
    mounts = [str(v) for s in services.values() for v in s.get("volumes") or []]

    def mounted(path, target_re):
        return any(re.fullmatch(rf"{re.escape(str(root / path))}:{target_re}(:ro)?", v) for v in mounts)

    conf = (root / RABBIT_CONF).read_text()
    m = re.search(r"^\s*load_definitions\s*=\s*(\S+)", conf, re.M)
    if not m:
        fail(RABBIT_CONF, "no load_definitions")
    elif not mounted(DEFS, re.escape(m.group(1))):
        fail(COMPOSE, f"does not mount {DEFS} at {m.group(1)} (rabbitmq.conf load_definitions)")
    if not mounted(RABBIT_CONF, r"/etc/rabbitmq/conf\.d/[^:]+\.conf"):
        fail(COMPOSE, f"does not mount {RABBIT_CONF} into /etc/rabbitmq/conf.d/")
if compose is not None and not mounted(HAPROXY, re.escape("/usr/local/etc/haproxy/haproxy.cfg")):
    fail(COMPOSE, f"does not mount {HAPROXY} at /usr/local/etc/haproxy/haproxy.cfg")

# ---- env examples and units --------------------------------------------------
examples = {"coordinator": "ferry-coordinator", "agent": "ferry-agent"}
example_env = {}
for stem, binary in examples.items():
    path = f"deploy/{stem}.env.example"
    example_env[stem] = read_env_file(root / path)
    check_env(path, binary, example_env[stem])

for unit in units:
    text = (root / unit).read_text()
    directives = re.findall(r"^(\w+)=(.*)$", text, re.M)
    get = lambda k: [v for d, v in directives if d == k]
    exe = (get("ExecStart") or [""])[0].split()[0] if get("ExecStart") else ""
    binary = exe.rsplit("/", 1)[-1]
    if binary not in ("ferry-coordinator", "ferry-agent"):
        fail(unit, f"ExecStart {exe!r} is not ferry-coordinator or ferry-agent")
        continue
    stem = binary.removeprefix("ferry-")
    env = {}
    for v in get("Environment"):
        for kv in re.findall(r'"([^"]*)"|(\S+)', v):
            k = (kv[0] or kv[1]).split("=", 1)[0]
            env[k] = ""
    check_env(unit, binary, env, check_required=False)
    files = get("EnvironmentFile")
    if files != [f"/etc/ferry/{stem}.env"]:
        fail(unit, f"EnvironmentFile={files} should be /etc/ferry/{stem}.env (from deploy/{stem}.env.example)")
    if get("DynamicUser") and get("DynamicUser")[0] in ("yes", "true", "1"):
        fail(unit, "DynamicUser=yes cannot read root-owned keys in /etc/ferry: run as the static ferry user")
    if get("User") != ["ferry"]:
        fail(unit, f"User={get('User')}: should be the static user ferry (deploy/systemd/ferry.sysusers.conf)")
    if get("KillSignal") != ["SIGTERM"]:
        fail(unit, "KillSignal=SIGTERM is what drains")
    stop = get("TimeoutStopSec")
    m = re.fullmatch(r"(\d+)(s|min)?", stop[0]) if stop else None
    stop_secs = int(m.group(1)) * (60 if m and m.group(2) == "min" else 1) if m else 90  # systemd default
    if not m:
        fail(unit, f"TimeoutStopSec={stop} is not a plain number of seconds")
    if binary == "ferry-agent":
        drain = int(example_env["agent"].get("FERRY_DRAIN_TIMEOUT", 60))
        if stop_secs <= max(drain, 60):
            fail(unit, f"TimeoutStopSec={stop_secs} is not above the agent's drain timeout ({max(drain, 60)} s): systemd would SIGKILL it mid-drain")
    for want in ("ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes",
                 "CapabilityBoundingSet=", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                 "SystemCallFilter=@system-service", "MemoryDenyWriteExecute=yes"):
        if not re.search(rf"^{re.escape(want)}$", text, re.M):
            fail(unit, f"missing hardening {want}")

# ---- .dockerignore -----------------------------------------------------------
try:
    ignore = {l.strip() for l in (root / ".dockerignore").read_text().splitlines()}
except OSError:
    ignore = set()
    fail(".dockerignore", "missing: target/, .git, .ferry-dev/ and private keys would go into the build context")
for want in (".git", "target/", ".ferry-dev/", "deploy/certs/", "**/*.key", "**/*.pem"):
    if want not in ignore:
        fail(".dockerignore", f"does not exclude {want}")

sys.exit(1 if failed else 0)
PY
    failures=$((failures + 1))
fi

# --- Grafana dashboards -------------------------------------------------------
# Valid JSON, and every ferry_* metric a query uses is one the README lists
# (so a renamed metric cannot leave a silently empty panel).
for dashboard in deploy/grafana/*.json; do
    [[ -e $dashboard ]] || continue
    if ! python3 -m json.tool "$dashboard" >/dev/null; then
        fail "$dashboard: not valid JSON"
        continue
    fi
    unknown=$(grep -o 'ferry_[a-z][a-z_]*' "$dashboard" | sed -E 's/_(bucket|sum|count)$//' | sort -u |
        while read -r metric; do
            grep -q "^| \`$metric\` |" README.md || echo "$metric"
        done)
    if [[ -n $unknown ]]; then
        fail "$dashboard: metrics not listed in README: $(echo $unknown)"
    else
        log "$dashboard: valid JSON, every metric documented"
    fi
done

if ((failures)); then
    echo "[check-deploy] deploy checks FAILED (see FAIL lines above)" >&2
    exit 1
fi
log "all deploy checks passed"
