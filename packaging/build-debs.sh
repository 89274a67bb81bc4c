#!/usr/bin/env bash
# Build release binaries and Debian packages for every gateway target, without Docker.
#
#   packaging/build-debs.sh                 # amd64, arm64 and armhf .debs into dist/
#   packaging/build-debs.sh aarch64 armv7   # only some targets (x86_64 | aarch64 | armv7)
#
# Output: dist/edgeferry_<version>-1_<arch>.deb per target, dist/edgeferry-<version>-<triple>
# (the stripped binary, for tarball users and qemu tests) and dist/build-report.txt (binary and
# .deb sizes, build wall time per target).
#
# Needs (installs the Rust parts itself, checks the rest):
#   apt-get install gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf \
#                   libc6-dev-arm64-cross libc6-dev-armhf-cross dpkg-dev
#   rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf   (done here)
#   cargo install cargo-deb --locked                                            (done here)
# Linkers and C compilers per target come from .cargo/config.toml.
#
# Environment:
#   CARGO_TARGET_DIR   honoured (default: target/)
#   DIST_DIR           output directory (default: dist/ at the repository top)
#   DEB_MAINTAINER     overrides the Maintainer field (default: Cargo.toml's metadata)
#   SOURCE_DATE_EPOCH  timestamps inside the .debs (default: the last commit's time, so two
#                      builds of one commit give byte-identical control data)
#
# Targets are built one after another on purpose: the build machines have 2 cores, and an LTO
# link per target already uses both.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DIST_DIR="${DIST_DIR:-$ROOT/dist}"
GEN_DIR="$ROOT/packaging/generated"
CARGO_DEB_VERSION="3.8.0"   # pinned: the metadata keys and systemd handling are tested with it
STORE_PATH="/var/lib/edgeferry/queue.db"

die() { echo "build-debs: error: $*" >&2; exit 1; }
log() { echo "build-debs: $*" >&2; }

# short name -> rust triple, debian arch, cross gcc (empty: native)
triple_of() {
    case "$1" in
        x86_64)  echo x86_64-unknown-linux-gnu ;;
        aarch64) echo aarch64-unknown-linux-gnu ;;
        armv7)   echo armv7-unknown-linux-gnueabihf ;;
        *) die "unknown target '$1' (expected x86_64, aarch64 or armv7)" ;;
    esac
}
debarch_of() {
    case "$1" in x86_64) echo amd64 ;; aarch64) echo arm64 ;; armv7) echo armhf ;; esac
}
cc_of() {
    case "$1" in x86_64) echo gcc ;; aarch64) echo aarch64-linux-gnu-gcc ;; armv7) echo arm-linux-gnueabihf-gcc ;; esac
}

if [ "$#" -gt 0 ]; then TARGETS=("$@"); else TARGETS=(x86_64 aarch64 armv7); fi

# --- Preconditions ---------------------------------------------------------------------------
[ -f config/edgeferry.toml ] || die "config/edgeferry.toml is missing (the packaged config is generated from it)"
[ -f README.md ] || die "README.md is missing (installed as /usr/share/doc/edgeferry/README.md)"
command -v dpkg-shlibdeps >/dev/null || die "dpkg-shlibdeps not found: apt-get install dpkg-dev"
for t in "${TARGETS[@]}"; do
    triple_of "$t" >/dev/null
    command -v "$(cc_of "$t")" >/dev/null || die "$(cc_of "$t") not found: see the apt-get line at the top of $0"
done

need_triples=()
for t in "${TARGETS[@]}"; do need_triples+=("$(triple_of "$t")"); done
installed="$(rustup target list --installed)"
missing=()
for tr in "${need_triples[@]}"; do grep -qx "$tr" <<<"$installed" || missing+=("$tr"); done
if [ "${#missing[@]}" -gt 0 ]; then
    log "rustup target add ${missing[*]}"
    rustup target add "${missing[@]}"
fi

if ! cargo deb --version >/dev/null 2>&1; then
    log "installing cargo-deb $CARGO_DEB_VERSION"
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi

# --- Generated inputs --------------------------------------------------------------------------
VERSION="$(cargo pkgid | sed 's/.*[#@]//')"
[ -n "$VERSION" ] || die "cannot read the package version from Cargo.toml"
MAINTAINER="${DEB_MAINTAINER:-$(sed -n '/^\[package\.metadata\.deb\]/,/^\[/ s/^maintainer *= *"\(.*\)"/\1/p' Cargo.toml)}"
[ -n "$MAINTAINER" ] || die "no maintainer in [package.metadata.deb] and DEB_MAINTAINER unset"
GLIBC_DEP="$(sed -n '/^\[package\.metadata\.deb\]/,/^\[/ s/^depends *=.*libc6 (>= *\([0-9.]*\)).*/\1/p' Cargo.toml)"
[ -n "$GLIBC_DEP" ] || die "no 'libc6 (>= X)' in [package.metadata.deb] depends"
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH="$(git log -1 --format=%ct 2>/dev/null || date +%s)"
fi
export SOURCE_DATE_EPOCH
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

mkdir -p "$GEN_DIR" "$DIST_DIR"

# The packaged config is the example config with the Debian store path. Only the `path` key of
# the [store] table is touched ([[serial]] tables have `path` keys too); if [store] has no active
# path key (e.g. it relies on a default) one is inserted under the header.
awk -v store="$STORE_PATH" '
    /^[[:space:]]*\[/ {
        if (in_store && !done) { print "path = \"" store "\""; done = 1 }
        header = $0; sub(/#.*/, "", header); gsub(/[[:space:]]/, "", header)
        in_store = (header == "[store]")
        print; next
    }
    in_store && !done && /^[[:space:]]*path[[:space:]]*=/ {
        # The example line'"'"'s own comment describes the development path: dropped.
        print "path = \"" store "\"  # StateDirectory=edgeferry; see the header"
        done = 1; next
    }
    { print }
    END { if (in_store && !done) print "path = \"" store "\"" }
' config/edgeferry.toml > "$GEN_DIR/edgeferry.toml.tmp"
grep -q '^[[:space:]]*\[store\]' "$GEN_DIR/edgeferry.toml.tmp" || printf '\n[store]\npath = "%s"\n' "$STORE_PATH" >> "$GEN_DIR/edgeferry.toml.tmp"
# Exactly one active store path, and it is the Debian one.
awk '/^[[:space:]]*\[/{s=($0 ~ /^[[:space:]]*\[store\]/)} s && /^[[:space:]]*path[[:space:]]*=/{print}' "$GEN_DIR/edgeferry.toml.tmp" \
    | grep -qx "path = \"$STORE_PATH\".*" || die "could not set [store] path in the packaged config"
mv "$GEN_DIR/edgeferry.toml.tmp" "$GEN_DIR/edgeferry.toml"
sed -i "1i # Packaged by edgeferry $VERSION for Debian: [store] path is $STORE_PATH (StateDirectory=).\n" "$GEN_DIR/edgeferry.toml"

# Debian changelog for this version (cargo-deb gzips it into usr/share/doc/edgeferry/).
cat > "$GEN_DIR/changelog" <<EOF
edgeferry ($VERSION-1) unstable; urgency=medium

  * Release $VERSION, built from commit $COMMIT.

 -- $MAINTAINER  $(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")
EOF

# --- Build ---------------------------------------------------------------------------------------
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
REPORT="$DIST_DIR/build-report.txt"
{
    echo "edgeferry $VERSION (commit $COMMIT) built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) cores"
    printf '%-32s %12s %12s %10s\n' target binary_bytes deb_bytes build_s
} > "$REPORT"

for t in "${TARGETS[@]}"; do
    triple="$(triple_of "$t")"; arch="$(debarch_of "$t")"
    log "[$t] cargo build --release --target $triple"
    # C code in the binary (bundled SQLite, ring) gets the flags Debian builds C with: fortified
    # libc calls and stack protector. Set per target, so host builds in the same tree are untouched.
    cflags_var="CFLAGS_${triple//-/_}"
    export "$cflags_var=${!cflags_var:-} -D_FORTIFY_SOURCE=2 -fstack-protector-strong"
    start=$(date +%s)
    cargo build --release --locked --target "$triple"
    secs=$(( $(date +%s) - start ))

    bin="$TARGET_DIR/$triple/release/edgeferry"
    [ -x "$bin" ] || die "[$t] $bin was not built"
    # [profile.release] strip = true already strips; cargo-deb's own strip would need the
    # target's binutils, so it is turned off (--no-strip) and the result is checked instead.
    if command -v file >/dev/null && ! file -b "$bin" | grep -q ', stripped'; then
        die "[$t] $bin is not stripped (check [profile.release] strip)"
    fi

    # The Depends line in Cargo.toml is written by hand (see the comment there): verify it.
    needed="$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort -u)"
    for lib in $needed; do
        case "$lib" in
            libc.so.6|libm.so.6|ld-linux*.so.*) ;;        # libc6
            libgcc_s.so.1) ;;                             # libgcc-s1
            *) die "[$t] binary needs $lib, which [package.metadata.deb] depends does not cover" ;;
        esac
    done
    glibc_need="$(readelf -W --dyn-syms "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)"
    if [ -n "$glibc_need" ] && dpkg --compare-versions "$glibc_need" gt "$GLIBC_DEP"; then
        die "[$t] binary needs GLIBC_$glibc_need but Depends says libc6 (>= $GLIBC_DEP): update Cargo.toml"
    fi

    log "[$t] cargo deb --target $triple"
    rm -f "$DIST_DIR"/edgeferry_*_"$arch".deb
    cargo deb --no-build --no-strip --locked --target "$triple" \
        ${DEB_MAINTAINER:+--maintainer "$DEB_MAINTAINER"} --output "$DIST_DIR/" >/dev/null
    deb="$DIST_DIR/edgeferry_${VERSION}-1_${arch}.deb"
    [ -f "$deb" ] || die "[$t] expected $deb"
    cp "$bin" "$DIST_DIR/edgeferry-$VERSION-$triple"

    printf '%-32s %12s %12s %10s\n' "$triple" "$(stat -c %s "$bin")" "$(stat -c %s "$deb")" "$secs" >> "$REPORT"
done

cat "$REPORT"
log "packages in $DIST_DIR:"
ls -l "$DIST_DIR"/*.deb >&2
