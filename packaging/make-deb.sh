#!/usr/bin/env bash
# Builds target/deb/gpuslice_<version>_<arch>.deb with dpkg-deb: `make install PREFIX=/usr` into
# a staging root, debug info stripped, /etc/gpuslice/config.toml as a conffile, the maintainer
# scripts of packaging/deb/ and a control file whose libc6 dependency is the newest glibc symbol
# version the binaries use. Usage: make-deb.sh [PROFILE] (release by default; `make deb` calls it).
#
# Why not cargo-deb: building it from crates.io costs CI minutes on two cores, and dpkg-deb is on
# every Debian-family machine already. The package layout is the one `make install` makes, so the
# two cannot drift apart.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${1:-release}
make=${MAKE:-make}
out=target/deb
stage=$out/stage

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "make-deb: no version in Cargo.toml's [workspace.package]" >&2; exit 1; }
arch=$(dpkg --print-architecture)
deb=$out/gpuslice_${version}_${arch}.deb

rm -rf "$stage"
mkdir -p "$stage"
"$make" --no-print-directory install DESTDIR="$PWD/$stage" PREFIX=/usr PROFILE="$profile" >/dev/null

# Debian ships binaries without debug sections (policy 10.1); the libraries they need come from
# the libc6 dependency below.
strip --strip-debug "$stage/usr/bin/gpuslice" "$stage/usr/lib/libgpuslice.so"

install -D -m 0644 packaging/config.toml "$stage/etc/gpuslice/config.toml"
install -D -m 0644 /dev/stdin "$stage/usr/share/doc/gpuslice/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: gpuslice

Files: *
Copyright: the gpuslice authors
License: MIT or Apache-2.0
EOF

# The newest GLIBC_x.y symbol version either binary needs is the libc6 it depends on: a machine
# with an older glibc could install the package and then fail to load the library.
glibc=$(objdump -T "$stage/usr/bin/gpuslice" "$stage/usr/lib/libgpuslice.so" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1)
[ -n "$glibc" ] || { echo "make-deb: found no GLIBC symbol versions in the binaries" >&2; exit 1; }

mkdir -p "$stage/DEBIAN"
installed_kib=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<EOF
Package: gpuslice
Version: $version
Architecture: $arch
Maintainer: gpuslice developers <gpuslice@localhost>
Installed-Size: $installed_kib
Depends: libc6 (>= $glibc)
Section: utils
Priority: optional
Description: share one NVIDIA GPU between unmodified programs
 gpuslice is a library preloaded into CUDA programs (LD_PRELOAD) that enforces
 device-memory quotas, shares of the GPU's time and priorities per process or
 per group, and a controller (gpuslice serve, a systemd unit) that keeps the
 shared ledger of who uses what and edits limits of running programs.
 .
 This package installs /usr/lib/libgpuslice.so, /usr/bin/gpuslice, the C
 header, the gpuslice.service unit (not enabled) and /etc/gpuslice/config.toml.
EOF
echo /etc/gpuslice/config.toml >"$stage/DEBIAN/conffiles"
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$stage/DEBIAN/"
(cd "$stage" && find . \( -path ./DEBIAN -o -path ./etc \) -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/conffiles" "$stage/DEBIAN/md5sums"

# DEB_COMPRESSION=gzip makes CI's package of the (large) debug build in 1 s instead of 10.
dpkg-deb --root-owner-group -Z"${DEB_COMPRESSION:-xz}" --build "$stage" "$deb" >/dev/null
# target/deb is the build context of examples/kubernetes/Dockerfile: leave only the package there.
rm -rf "$stage"
echo "$deb"
