#!/usr/bin/env bash
# Checks `make install` (into a temporary DESTDIR), `make uninstall` and the Debian package
# (packaging/make-deb.sh) file by file: paths, modes, owners, the generated systemd unit, the
# control fields, the maintainer scripts, and that the installed binary finds the installed
# library. Usage: check.sh [PROFILE]; `make check-packaging` runs it on the debug build, which
# `make test` has already built (nothing is rebuilt here).
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=${1:-debug}
make=${MAKE:-make}
[ -x "target/$profile/gpuslice" ] && [ -f "target/$profile/libgpuslice.so" ] ||
    { echo "check-packaging: build target/$profile first (cargo build -p gpuslice-shim -p gpuslice)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
ok() { echo "ok   $*"; }
fail() { echo "FAIL $*"; failures=$((failures + 1)); }
check() { # check "what" command...
    local what=$1
    shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}
mode_is() { [ "$(stat -c %a "$1")" = "$2" ]; }
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)

# ------------------------------------------------------------------ make install / uninstall
root=$tmp/install
"$make" --no-print-directory install DESTDIR="$root" PREFIX=/usr/local PROFILE="$profile" >"$tmp/install.log"
p=$root/usr/local
check "install: bin/gpuslice 0755" mode_is "$p/bin/gpuslice" 755
check "install: lib/libgpuslice.so 0644" mode_is "$p/lib/libgpuslice.so" 644
check "install: include/gpuslice.h 0644, the repository's header" cmp -s include/gpuslice.h "$p/include/gpuslice.h"
check "install: lib/systemd/system/gpuslice.service 0644" mode_is "$p/lib/systemd/system/gpuslice.service" 644
check "install: share/gpuslice/config.toml" cmp -s packaging/config.toml "$p/share/gpuslice/config.toml"
check "install: share/doc/gpuslice/{README,LD_PRELOAD}.md" test -f "$p/share/doc/gpuslice/README.md" -a -f "$p/share/doc/gpuslice/LD_PRELOAD.md"
unit=$p/lib/systemd/system/gpuslice.service
check "install: the unit runs PREFIX/bin/gpuslice serve" grep -qx 'ExecStart=/usr/local/bin/gpuslice serve' "$unit"
check "install: the unit keeps /run/gpuslice across restarts" grep -qx 'RuntimeDirectoryPreserve=yes' "$unit"
check "install: no @PLACEHOLDER@ left in the unit" bash -c '! grep -q "@[A-Z]*@" "$1"' _ "$unit"
if command -v systemd-analyze >/dev/null; then
    # verify wants ExecStart's binary to exist: point it at the DESTDIR copy. verify exits 0 on
    # unknown keys and only prints them, so the check is "prints nothing".
    sed "s|^ExecStart=/usr/local/bin/|ExecStart=$p/bin/|" "$unit" >"$tmp/gpuslice.service"
    check "install: systemd-analyze verify finds nothing to say" bash -c '[ -z "$(systemd-analyze verify "$1" 2>&1)" ]' _ "$tmp/gpuslice.service"
else
    echo "note systemd-analyze is not installed: the unit's keys were not verified"
fi
# The installed CLI finds the installed library (../lib from bin/), as `gpuslice run` needs.
preload=$(env -u GPUSLICE_LIB -u LD_PRELOAD "$p/bin/gpuslice" run -- printenv LD_PRELOAD)
check "install: gpuslice run preloads PREFIX/lib/libgpuslice.so ($preload)" [ "$(realpath "$preload")" = "$(realpath "$p/lib/libgpuslice.so")" ]
# The example config parses as shipped (all commented: no limits) and with every example line
# uncommented, so that what it suggests is valid.
check "install: the example config parses as shipped" bash -c '[ "$(env -i "$1" check-config "$2" | tail -1)" = "a process started here gets: no limits" ]' _ "$p/bin/gpuslice" "$p/share/gpuslice/config.toml"
sed -E 's/^# ?(\[|[a-z_]+ = )/\1/' "$p/share/gpuslice/config.toml" >"$tmp/uncommented.toml"
described=$(env -i "$p/bin/gpuslice" check-config "$tmp/uncommented.toml" 2>&1 || true)
check "install: the example config's commented lines parse ($described)" grep -q '^a process started here gets: memory 16.00 GiB on every device' <<<"$described"
"$make" --no-print-directory uninstall DESTDIR="$root" PREFIX=/usr/local >/dev/null
left=$(find "$root" -type f)
check "uninstall: removes every installed file${left:+ (left: $left)}" [ -z "$left" ]

# ------------------------------------------------------------------ the Debian package
deb=$(DEB_COMPRESSION=gzip MAKE="$make" bash packaging/make-deb.sh "$profile")
check "deb: named gpuslice_${version}_$(dpkg --print-architecture).deb" [ "$(basename "$deb")" = "gpuslice_${version}_$(dpkg --print-architecture).deb" ]
field() { dpkg-deb -f "$deb" "$1"; }
check "deb: Package gpuslice" [ "$(field Package)" = gpuslice ]
check "deb: Version $version (Cargo.toml)" [ "$(field Version)" = "$version" ]
check "deb: Architecture $(dpkg --print-architecture)" [ "$(field Architecture)" = "$(dpkg --print-architecture)" ]
check "deb: Depends on a libc6 version ($(field Depends))" grep -Eqx 'libc6 \(>= 2\.[0-9]+\)' <<<"$(field Depends)"
check "deb: Installed-Size given" grep -Eqx '[0-9]+' <<<"$(field Installed-Size)"

# The exact file list, with modes and owners.
dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { print $1, $2, $6 }' | sort >"$tmp/files"
sort >"$tmp/expected" <<'EOF'
-rwxr-xr-x root/root ./usr/bin/gpuslice
-rw-r--r-- root/root ./usr/lib/libgpuslice.so
-rw-r--r-- root/root ./usr/include/gpuslice.h
-rw-r--r-- root/root ./usr/lib/systemd/system/gpuslice.service
-rw-r--r-- root/root ./usr/share/gpuslice/config.toml
-rw-r--r-- root/root ./usr/share/doc/gpuslice/README.md
-rw-r--r-- root/root ./usr/share/doc/gpuslice/LD_PRELOAD.md
-rw-r--r-- root/root ./usr/share/doc/gpuslice/copyright
-rw-r--r-- root/root ./etc/gpuslice/config.toml
EOF
check "deb: exactly the expected files, modes and owners$(diff "$tmp/expected" "$tmp/files" | sed -n 's/^[<>].*/\n     &/p' | tr -d '\n')" cmp -s "$tmp/expected" "$tmp/files"
check "deb: directories are root/root 0755" bash -c '! dpkg-deb -c "$1" | awk "\$1 ~ /^d/" | grep -v "^drwxr-xr-x root/root"' _ "$deb"

x=$tmp/deb
dpkg-deb -x "$deb" "$x"
dpkg-deb -e "$deb" "$x/DEBIAN"
check "deb: conffiles lists /etc/gpuslice/config.toml" [ "$(cat "$x/DEBIAN/conffiles")" = /etc/gpuslice/config.toml ]
check "deb: md5sums match the contents" bash -c 'cd "$1" && md5sum --quiet -c DEBIAN/md5sums' _ "$x"
check "deb: the unit runs /usr/bin/gpuslice serve" grep -qx 'ExecStart=/usr/bin/gpuslice serve' "$x/usr/lib/systemd/system/gpuslice.service"
check "deb: gpuslice --version says $version" grep -q "$version" <<<"$("$x/usr/bin/gpuslice" --version)"
check "deb: binaries carry no debug sections" bash -c '! objdump -h "$1" "$2" | grep -q "\.debug_info"' _ "$x/usr/bin/gpuslice" "$x/usr/lib/libgpuslice.so"
check "deb: the library still exports the interposed driver entry points" bash -c 'objdump -T "$1" | grep -q " cuMemAlloc_v2$"' _ "$x/usr/lib/libgpuslice.so"
for script in postinst prerm postrm; do
    check "deb: $script is 0755 and parses" bash -c 'mode_is() { [ "$(stat -c %a "$1")" = "$2" ]; }; mode_is "$1" 755 && sh -n "$1"' _ "$x/DEBIAN/$script"
done
# Without a running systemd (a container, a chroot) the scripts must not call systemctl: a fake
# systemctl first on PATH records any call.
if [ ! -d /run/systemd/system ]; then
    mkdir -p "$tmp/fakebin"
    printf '#!/bin/sh\necho "$@" >>"%s"\n' "$tmp/systemctl.calls" >"$tmp/fakebin/systemctl"
    chmod +x "$tmp/fakebin/systemctl"
    PATH="$tmp/fakebin:$PATH" sh "$x/DEBIAN/postinst" configure ""
    PATH="$tmp/fakebin:$PATH" sh "$x/DEBIAN/postinst" configure 0.0.9
    PATH="$tmp/fakebin:$PATH" sh "$x/DEBIAN/prerm" remove
    PATH="$tmp/fakebin:$PATH" sh "$x/DEBIAN/postrm" remove
    check "deb: without systemd the maintainer scripts succeed and never call systemctl" [ ! -e "$tmp/systemctl.calls" ]
else
    echo "note systemd runs here: the maintainer scripts were only parsed, not run"
fi

if [ "$failures" -ne 0 ]; then
    echo "check-packaging: $failures check(s) failed" >&2
    exit 1
fi
echo "check-packaging: all checks passed ($deb)"
