#!/usr/bin/env bash
# Install everything packaging/build-debs.sh, ci-check.sh and qemu-smoke.sh need on Debian 12.
# Idempotent; needs root for apt-get (skipped with a message when everything is present).
#
#   packaging/install-deps.sh
set -euo pipefail

APT_PACKAGES=(
    gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf       # cross linkers + C compilers (SQLite, ring)
    libc6-dev-arm64-cross libc6-dev-armhf-cross         # target glibc to link against / for qemu -L
    qemu-user                                           # run the ARM binaries on x86_64
    dpkg-dev binutils file                              # cargo-deb, readelf, `file` checks
    lintian                                             # package checks
    mosquitto mosquitto-clients                         # upstream broker and clients for the smoke
    systemd                                             # systemd-analyze verify/security
)
RUST_TARGETS=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
CARGO_DEB_VERSION="3.8.0"

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { echo "install-deps: run as root to install: ${missing[*]}" >&2; exit 1; }
    echo "install-deps: apt-get install ${missing[*]}" >&2
    apt-get update -qq
    # mosquitto's postinst starts its system service where systemd runs; the smoke test uses its
    # own instance on a free port, so the system one does not get in the way.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

installed="$(rustup target list --installed)"
for t in "${RUST_TARGETS[@]}"; do
    grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

if ! cargo deb --version >/dev/null 2>&1; then
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi
echo "install-deps: ok" >&2
