#!/usr/bin/env bash
# End-to-end smoke of a (cross-built) edgeferry binary under qemu-user, on loopback only.
#
#   packaging/qemu-smoke.sh                          # dist/ binaries for aarch64 and armv7
#   packaging/qemu-smoke.sh aarch64 [BINARY]         # one target (x86_64 | aarch64 | armv7)
#
# What it proves, per target (aarch64 speaks MQTT 5 upstream, armv7 MQTT 3.1.1, x86_64 v5):
#   1. the daemon starts while its upstream is DOWN and accepts a QoS 1 publish on its local
#      listener (mosquitto_pub gets its PUBACK);
#   2. the message was committed: it is forwarded after the upstream (mosquitto) comes up;
#   3. a second message published with the upstream up follows it, in order;
#   4. SIGTERM stops the daemon with exit 0 within the shutdown grace.
# The upstream subscriber uses a persistent session created before the daemon starts, so the
# check does not depend on who connects to mosquitto first.
#
# Bounded: every wait has a deadline; every process started here is killed by its PID on exit.
# Needs: qemu-user, libc6-dev-{arm64,armhf}-cross, mosquitto, mosquitto-clients.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIST_DIR="${DIST_DIR:-$ROOT/dist}"

log() { echo "qemu-smoke: $*" >&2; }

if [ "$#" -eq 0 ]; then
    status=0
    for t in aarch64 armv7; do "$0" "$t" || status=1; done
    exit "$status"
fi

TARGET="$1"
case "$TARGET" in
    x86_64)  TRIPLE=x86_64-unknown-linux-gnu;      RUNNER=();                                      PROTOCOL=v5 ;;
    aarch64) TRIPLE=aarch64-unknown-linux-gnu;     RUNNER=(qemu-aarch64 -L /usr/aarch64-linux-gnu);  PROTOCOL=v5 ;;
    armv7)   TRIPLE=armv7-unknown-linux-gnueabihf; RUNNER=(qemu-arm -L /usr/arm-linux-gnueabihf);    PROTOCOL=v3.1.1 ;;
    *) echo "usage: $0 [x86_64|aarch64|armv7 [BINARY]]" >&2; exit 2 ;;
esac
if [ "$#" -ge 2 ]; then
    BIN="$2"
else
    BIN="$(ls "$DIST_DIR"/edgeferry-*-"$TRIPLE" 2>/dev/null | sort -V | tail -1 || true)"
fi
[ -n "$BIN" ] && [ -x "$BIN" ] || { log "[$TARGET] no binary (run packaging/build-debs.sh $TARGET)"; exit 1; }
for c in mosquitto mosquitto_pub mosquitto_sub ${RUNNER[0]:+"${RUNNER[0]}"}; do
    command -v "$c" >/dev/null || { log "$c not found: packaging/install-deps.sh"; exit 1; }
done

WORK="$(mktemp -d /tmp/edgeferry-smoke.XXXXXX)"
PIDS=()
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Bounded: SIGKILL whatever ignored SIGTERM for 5 s.
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "$rc" -ne 0 ]; then
        for f in "$WORK"/*.log; do
            [ -f "$f" ] || continue
            echo "----- $(basename "$f") (last 40 lines)" >&2
            tail -n 40 "$f" >&2
        done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
fail() { log "[$TARGET] FAIL: $*"; exit 1; }
forget_pid() { local p; local keep=(); for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done; PIDS=("${keep[@]}"); }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local p
    for _ in $(seq 100); do
        p=$(( 20000 + RANDOM % 40000 ))
        port_open "$p" || { echo "$p"; return 0; }
    done
    return 1
}
# wait_port PORT SECONDS PID: until PORT accepts, failing early if PID died.
wait_port() {
    local deadline=$(( SECONDS + $2 ))
    while ! port_open "$1"; do
        kill -0 "$3" 2>/dev/null || return 1
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

UP_PORT="$(free_port)" || fail "no free port"
LOCAL_PORT="$(free_port)" || fail "no free port"
[ "$UP_PORT" != "$LOCAL_PORT" ] || LOCAL_PORT=$(( UP_PORT + 1 ))
SUB_ID="edgeferry-smoke-sub-$$"
TOPIC="devices/smoke-$TARGET/temp"
MSG1="smoke-$TARGET-outage-$$-$RANDOM"
MSG2="smoke-$TARGET-live-$$-$RANDOM"

# --- Upstream: mosquitto with persistence, so the subscriber's session survives its restart. ----
mkdir -p "$WORK/up"
cat > "$WORK/mosquitto.conf" <<EOF
listener $UP_PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $WORK/up/
autosave_interval 0
log_dest file $WORK/mosquitto.log
log_type all
user $(id -un)
EOF
start_upstream() {
    mosquitto -c "$WORK/mosquitto.conf" >>"$WORK/mosquitto.log" 2>&1 &
    UP_PID=$!
    PIDS+=("$UP_PID")
    wait_port "$UP_PORT" 10 "$UP_PID" || fail "mosquitto did not listen on $UP_PORT"
}
stop_upstream() {
    kill "$UP_PID"
    for _ in $(seq 100); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$UP_PID" 2>/dev/null && fail "mosquitto did not stop"
    wait "$UP_PID" 2>/dev/null || true
    forget_pid "$UP_PID"
}

log "[$TARGET] upstream 127.0.0.1:$UP_PORT ($PROTOCOL), local 127.0.0.1:$LOCAL_PORT, binary $BIN"
start_upstream
# Persistent QoS 1 session for the subscriber (-c, fixed id); -E exits once subscribed.
timeout 15 mosquitto_sub -h 127.0.0.1 -p "$UP_PORT" -i "$SUB_ID" -c -q 1 -t 'devices/#' -E \
    || fail "could not create the subscriber session"
stop_upstream   # upstream outage from here on

# --- The daemon, with its upstream down. ---------------------------------------------------------
cat > "$WORK/edgeferry.toml" <<EOF
[gateway]
id = "smoke-$TARGET"

[local]
listen = "127.0.0.1:$LOCAL_PORT"

[store]
path = "$WORK/queue.db"

[upstream]
address = "127.0.0.1:$UP_PORT"
protocol = "$PROTOCOL"
client_id = "edgeferry-smoke-$TARGET-$$"
tls = false

[[route]]
from = "devices/#"
to = "{topic}"
qos = 1
EOF
timeout 60 "${RUNNER[@]}" "$BIN" check --config "$WORK/edgeferry.toml" >"$WORK/check.log" 2>&1 \
    || fail "edgeferry check rejected the smoke config"

# No NOTIFY_SOCKET/WATCHDOG_USEC here: sd-notify calls must be no-ops outside systemd.
env -u NOTIFY_SOCKET -u WATCHDOG_USEC -u WATCHDOG_PID RUST_LOG="${RUST_LOG:-info}" \
    "${RUNNER[@]}" "$BIN" run --config "$WORK/edgeferry.toml" >"$WORK/edgeferry.log" 2>&1 &
EF_PID=$!
PIDS+=("$EF_PID")
# qemu start-up plus store creation can take a while on a loaded 2-core machine.
wait_port "$LOCAL_PORT" 60 "$EF_PID" || fail "daemon did not listen on 127.0.0.1:$LOCAL_PORT"

timeout 30 mosquitto_pub -h 127.0.0.1 -p "$LOCAL_PORT" -i "smoke-dev-$$" -q 1 -t "$TOPIC" -m "$MSG1" \
    || fail "QoS 1 publish to the daemon (upstream down) was not acknowledged"
log "[$TARGET] publish accepted with the upstream down"
# In WAL mode the main file may still be empty before the first checkpoint: either will do.
[ -s "$WORK/queue.db" ] || [ -s "$WORK/queue.db-wal" ] \
    || fail "store $WORK/queue.db missing or empty after an acknowledged publish"
kill -0 "$EF_PID" 2>/dev/null || fail "daemon exited"

# --- Upstream back: the committed message must arrive, then a live one, in order. ---------------
start_upstream
timeout 75 mosquitto_sub -h 127.0.0.1 -p "$UP_PORT" -i "$SUB_ID" -c -q 1 -t 'devices/#' \
    -C 2 -W 70 -v >"$WORK/received.log" 2>"$WORK/sub.log" &
SUB_PID=$!
PIDS+=("$SUB_PID")
# No need to wait for the reconnect: MSG1 was committed first, so the queue sends it first.
timeout 30 mosquitto_pub -h 127.0.0.1 -p "$LOCAL_PORT" -i "smoke-dev-$$" -q 1 -t "$TOPIC" -m "$MSG2" \
    || fail "QoS 1 publish to the daemon (upstream up) was not acknowledged"

wait "$SUB_PID" && sub_rc=0 || sub_rc=$?
forget_pid "$SUB_PID"
expected="$(printf '%s %s\n%s %s' "$TOPIC" "$MSG1" "$TOPIC" "$MSG2")"
if [ "$(cat "$WORK/received.log")" != "$expected" ]; then
    log "[$TARGET] expected upstream to receive:"; echo "$expected" >&2
    log "[$TARGET] received (mosquitto_sub exit $sub_rc):"; cat "$WORK/received.log" >&2
    fail "forwarding"
fi
log "[$TARGET] upstream received both messages in order"

# --- Graceful shutdown. -------------------------------------------------------------------------
kill -TERM "$EF_PID"
deadline=$(( SECONDS + 20 ))   # the unit's TimeoutStopSec
while kill -0 "$EF_PID" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
kill -0 "$EF_PID" 2>/dev/null && fail "daemon still running 20 s after SIGTERM"
wait "$EF_PID" && ef_rc=0 || ef_rc=$?
forget_pid "$EF_PID"
[ "$ef_rc" -eq 0 ] || fail "daemon exited $ef_rc after SIGTERM (expected 0)"

log "[$TARGET] PASS"
