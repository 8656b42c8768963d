#!/bin/bash
# Build the edgeserve .deb with dpkg-deb alone (no debhelper).
#
#   packaging/build-deb.sh [--dry-run] [--out DIR] [--python PY] [--torch-index URL]
#                          [--compress xz|gzip|zstd]
#
# The package holds:
#   /opt/edgeserve/                       a venv: this repo's wheel + constraints.txt pins
#   /usr/bin/edgeserve                    -> /opt/edgeserve/bin/edgeserve
#   /lib/systemd/system/edgeserve.service systemd/edgeserve.service
#   /etc/edgeserve/config.yaml            packaging/config.yaml (conffile, all defaults)
#   /usr/share/doc/edgeserve/             README, systemd notes, drop-in examples
# and the maintainer scripts packaging/{postinst,prerm,postrm}.
#
# --dry-run builds everything but the venv (no network, no torch) into
# edgeserve_<version>_<arch>.dry-run.deb, to inspect the layout and the control files.
# The venv is made from --python (default /usr/bin/python3): its bin/python links to that
# interpreter, so the package depends on the same Python minor version.
# pip options from the environment (PIP_FIND_LINKS, PIP_INDEX_URL, ...) apply; torch comes
# from --torch-index (default: the PyTorch CPU index; "" to rely on pip's own settings).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/dist"
PYTHON=/usr/bin/python3
TORCH_INDEX=https://download.pytorch.org/whl/cpu
COMPRESS=xz
DRY_RUN=0
REVISION=1

die() { echo "build-deb: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT=$2; shift ;;
        --python) PYTHON=$2; shift ;;
        --torch-index) TORCH_INDEX=$2; shift ;;
        --compress) COMPRESS=$2; shift ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
    shift
done

command -v dpkg-deb >/dev/null || die "dpkg-deb not found (apt-get install dpkg)"
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/agent/__init__.py")
[ -n "$VERSION" ] || die "no __version__ in agent/__init__.py"
ARCH=$(dpkg --print-architecture)
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ||
    die "cannot run $PYTHON"
PYNEXT="${PYVER%%.*}.$(( ${PYVER#*.} + 1 ))"

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
PKG="$STAGE/pkg"
VENV="$PKG/opt/edgeserve"

install_files() {
    install -D -m 0644 "$ROOT/systemd/edgeserve.service" "$PKG/lib/systemd/system/edgeserve.service"
    install -D -m 0640 "$ROOT/packaging/config.yaml" "$PKG/etc/edgeserve/config.yaml"
    local doc="$PKG/usr/share/doc/edgeserve"
    install -D -m 0644 "$ROOT/systemd/README.md" "$doc/systemd.md"
    [ -f "$ROOT/README.md" ] && install -m 0644 "$ROOT/README.md" "$doc/README.md"
    install -d "$doc/examples"
    install -m 0644 "$ROOT"/systemd/*.conf.example "$doc/examples/"
    install -d "$PKG/usr/bin"
    ln -s /opt/edgeserve/bin/edgeserve "$PKG/usr/bin/edgeserve"
}

build_venv() {
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
    local index=()
    [ -n "$TORCH_INDEX" ] && index=(--extra-index-url "$TORCH_INDEX")
    "$PYTHON" -m venv "$VENV"
    "${pip[@]}" wheel --no-deps -w "$STAGE/wheels" "$ROOT"
    "${pip[@]}" install --no-compile "${index[@]}" -c "$ROOT/constraints.txt" \
        "$STAGE"/wheels/edgeserve-*.whl
    "${pip[@]}" uninstall -y pip setuptools >/dev/null 2>&1 || true
    # A venv names its own path in scripts and pyvenv.cfg: point them at /opt/edgeserve.
    grep -rlF "$VENV" "$VENV/bin" "$VENV/pyvenv.cfg" | xargs -r sed -i "s|$VENV|/opt/edgeserve|g"
    # Byte code now, with the installed paths, so the read-only /opt never gets written.
    # Some wheels ship files for newer Pythons (torch: py312_intrinsics.py) that cannot
    # compile here; pip skips those too, so a failure is not fatal.
    "$VENV/bin/python" -m compileall -qq -j0 -s "$PKG" -p / "$VENV/lib" || true
}

write_control() {
    install -d -m 0755 "$PKG/DEBIAN"
    local script
    for script in postinst prerm postrm; do
        install -m 0755 "$ROOT/packaging/$script" "$PKG/DEBIAN/$script"
    done
    echo /etc/edgeserve/config.yaml >"$PKG/DEBIAN/conffiles"
    cat >"$PKG/DEBIAN/control" <<EOF
Package: edgeserve
Version: $VERSION-$REVISION
Architecture: $ARCH
Maintainer: edgeserve maintainers <edgeserve@localhost>
Installed-Size: $(du -sk "$PKG" | cut -f1)
Depends: python3 (>= $PYVER), python3 (<< $PYNEXT), adduser, libc6 (>= 2.28)
Recommends: systemd
Section: net
Priority: optional
Description: inference daemon for edge devices
 edgeserve keeps verified TorchScript model archives on local disk and serves
 them to local applications over gRPC (KServe Open Inference Protocol v2) with
 adaptive batching, on CPU or a local GPU. It runs as the systemd service
 edgeserve.service under its own user, listening on a Unix socket and loopback.
EOF
}

install_files
if [ "$DRY_RUN" = 0 ]; then
    build_venv
fi
write_control
mkdir -p "$OUT"
suffix=$([ "$DRY_RUN" = 1 ] && echo .dry-run || true)
DEB="$OUT/edgeserve_${VERSION}-${REVISION}_${ARCH}${suffix}.deb"
dpkg-deb --root-owner-group -Z"$COMPRESS" --build "$PKG" "$DEB" >/dev/null
echo "$DEB"
