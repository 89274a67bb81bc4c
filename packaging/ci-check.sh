#!/usr/bin/env bash
# Packaging checks for CI (called from .ci/run). Needs root (dpkg -i) on a throwaway Debian 12.
#
#   packaging/ci-check.sh
#
#   1. packaging/install-deps.sh, then packaging/build-debs.sh: amd64, arm64, armhf .debs in dist/
#      (SKIP_BUILD=1 reuses an existing dist/)
#   2. lintian on each .deb; any error fails
#   3. each binary (ARM ones under qemu-user) answers --version and accepts
#      `check --config config/edgeferry.toml`
#   4. the unit file passes systemd-analyze verify and its exposure is at most MAX_EXPOSURE
#   5. amd64 .deb lifecycle: install -> user, files, conffile, unit, state dir, `check` as the
#      service user -> local conffile edit survives a reinstall -> remove keeps config and data
#      -> purge removes them, keeps the user (Debian practice)
#   6. packaging/qemu-smoke.sh for aarch64 and armv7 (SKIP_SMOKE=1 skips it)
#
# Prints "N passed, N failed" at the end; exits non-zero if anything failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DIST_DIR="${DIST_DIR:-$ROOT/dist}"
export DIST_DIR
MAX_EXPOSURE="${MAX_EXPOSURE:-2.0}"
PKG=edgeferry

passed=0
failed=0
ok()   { passed=$((passed + 1)); echo "ci-check: ok   - $*"; }
bad()  { failed=$((failed + 1)); echo "ci-check: FAIL - $*"; }
check() { local what="$1"; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
finish() {
    echo "packaging: $passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit $?
}
die() { bad "$*"; finish; }

[ "$(id -u)" = 0 ] || die "ci-check needs root (dpkg -i / --purge)"

# --- 1. Build --------------------------------------------------------------------------------------
packaging/install-deps.sh || die "install-deps.sh"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    timeout 3600 packaging/build-debs.sh || die "build-debs.sh"
fi
VERSION="$(cargo pkgid | sed 's/.*[#@]//')"
declare -A TRIPLE=([amd64]=x86_64-unknown-linux-gnu [arm64]=aarch64-unknown-linux-gnu [armhf]=armv7-unknown-linux-gnueabihf)
declare -A RUNNER=([amd64]="" [arm64]="qemu-aarch64 -L /usr/aarch64-linux-gnu" [armhf]="qemu-arm -L /usr/arm-linux-gnueabihf")
for arch in amd64 arm64 armhf; do
    [ -f "$DIST_DIR/${PKG}_${VERSION}-1_${arch}.deb" ] || die "missing $DIST_DIR/${PKG}_${VERSION}-1_${arch}.deb"
done

# --- 2. lintian ------------------------------------------------------------------------------------
for arch in amd64 arm64 armhf; do
    deb="$DIST_DIR/${PKG}_${VERSION}-1_${arch}.deb"
    # --fail-on error: warnings are printed (and reviewed), errors fail the build.
    out="$(timeout 600 lintian --fail-on error --info --display-info "$deb" 2>&1)"; rc=$?
    [ -n "$out" ] && echo "$out" | grep -v 'running with root privileges' | sed "s/^/  lintian($arch): /"
    check "lintian $arch: no errors" test "$rc" -eq 0
done

# --- 3. Binaries (ARM under qemu-user) -------------------------------------------------------------
for arch in amd64 arm64 armhf; do
    bin="$DIST_DIR/$PKG-$VERSION-${TRIPLE[$arch]}"
    # shellcheck disable=SC2086  # RUNNER is a word list on purpose
    ver="$(timeout 60 ${RUNNER[$arch]} "$bin" --version 2>&1)"; rc=$?
    check "$arch --version exits 0 and names $VERSION (got: ${ver:-nothing})" \
        test "$rc" -eq 0 -a -n "$ver" -a -z "${ver##*"$VERSION"*}"
    out="$(timeout 60 ${RUNNER[$arch]} "$bin" check --config config/edgeferry.toml 2>&1)"; rc=$?
    check "$arch check --config config/edgeferry.toml exits 0${out:+ ($out)}" test "$rc" -eq 0
done

# --- 4. Unit file ----------------------------------------------------------------------------------
exposure="$(systemd-analyze security --offline=yes packaging/edgeferry.service 2>/dev/null \
    | sed -n 's/.*Overall exposure level for edgeferry.service: \([0-9.]*\).*/\1/p')"
check "unit exposure ${exposure:-?} <= $MAX_EXPOSURE" \
    awk -v e="${exposure:-99}" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e + 0 <= m + 0) }'

# --- 5. amd64 package lifecycle --------------------------------------------------------------------
deb="$DIST_DIR/${PKG}_${VERSION}-1_amd64.deb"
purge_pkg() { dpkg --purge "$PKG" >/dev/null 2>&1 || true; }
if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -q installed; then
    echo "ci-check: purging a previously installed $PKG first (CI machines are throwaway)"
    purge_pkg
fi
trap purge_pkg EXIT

check "dpkg -i (fresh install)" timeout 300 dpkg -i "$deb"
check "user edgeferry exists with nologin shell" \
    sh -c 'getent passwd edgeferry | grep -q ":/usr/sbin/nologin$"'
check "user edgeferry is a system user (uid < 1000)" \
    sh -c 'test "$(id -u edgeferry)" -lt 1000'
check "group edgeferry exists" sh -c "getent group edgeferry >/dev/null"
check "edgeferry is in dialout" sh -c 'id -nG edgeferry | tr " " "\n" | grep -qx dialout'
check "/usr/bin/edgeferry executable" test -x /usr/bin/edgeferry
check "/etc/edgeferry/edgeferry.toml present" test -f /etc/edgeferry/edgeferry.toml
check "/etc/edgeferry/edgeferry.toml is a conffile" \
    sh -c "dpkg-query -W -f='\${Conffiles}' $PKG | grep -q '^ /etc/edgeferry/edgeferry.toml '"
check "packaged store path is /var/lib/edgeferry/queue.db" \
    grep -q '^path = "/var/lib/edgeferry/queue.db"' /etc/edgeferry/edgeferry.toml
unit=/usr/lib/systemd/system/edgeferry.service
check "unit installed at $unit" test -f "$unit"
check "unit enabled (multi-user.target.wants symlink)" \
    test -L /etc/systemd/system/multi-user.target.wants/edgeferry.service
# Any finding is printed; a clean unit prints nothing and exits 0.
verify_out="$(timeout 60 systemd-analyze verify "$unit" 2>&1)"; rc=$?
[ -n "$verify_out" ] && echo "$verify_out" | sed 's/^/  verify: /'
check "systemd-analyze verify $unit: exit 0, no findings" test "$rc" -eq 0 -a -z "$verify_out"
check "/var/lib/edgeferry is edgeferry:edgeferry 750" \
    test "$(stat -c '%U:%G %a' /var/lib/edgeferry)" = "edgeferry:edgeferry 750"
check "man page installed" test -f /usr/share/man/man1/edgeferry.1.gz
check "copyright installed" test -f /usr/share/doc/edgeferry/copyright
out="$(timeout 60 runuser -u edgeferry -- /usr/bin/edgeferry check --config /etc/edgeferry/edgeferry.toml 2>&1)"; rc=$?
check "edgeferry check of the packaged config as the service user exits 0${out:+ ($out)}" test "$rc" -eq 0

echo "# local edit by ci-check" >> /etc/edgeferry/edgeferry.toml
echo "fake queue" > /var/lib/edgeferry/queue.db
check "dpkg -i again (reinstall/upgrade path)" timeout 300 dpkg -i --force-confold "$deb"
check "local conffile edit survives the reinstall" grep -q '^# local edit by ci-check' /etc/edgeferry/edgeferry.toml
check "queue survives the reinstall" test -f /var/lib/edgeferry/queue.db

check "dpkg -r (remove)" timeout 300 dpkg -r "$PKG"
check "remove: binary gone" test ! -e /usr/bin/edgeferry
check "remove: unit gone" test ! -e "$unit"
check "remove: config kept" test -f /etc/edgeferry/edgeferry.toml
check "remove: queue kept" test -f /var/lib/edgeferry/queue.db

check "dpkg --purge" timeout 300 dpkg --purge "$PKG"
check "purge: package unknown to dpkg" sh -c "! dpkg-query -W -f='\${Status}' $PKG 2>/dev/null | grep -q installed"
check "purge: /etc/edgeferry removed" test ! -e /etc/edgeferry
check "purge: /var/lib/edgeferry removed" test ! -e /var/lib/edgeferry
check "purge: enablement symlink removed" test ! -e /etc/systemd/system/multi-user.target.wants/edgeferry.service
check "purge: user edgeferry kept (Debian practice, see packaging/debian/postrm)" sh -c "getent passwd edgeferry >/dev/null"
trap - EXIT

# --- 6. qemu end-to-end smoke ----------------------------------------------------------------------
if [ "${SKIP_SMOKE:-0}" != 1 ]; then
    for t in aarch64 armv7; do
        check "qemu smoke $t" timeout 300 packaging/qemu-smoke.sh "$t"
    done
fi

finish
