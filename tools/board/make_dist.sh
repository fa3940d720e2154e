#!/usr/bin/env bash
# Build the offline install archive for 64-bit Raspberry Pi OS / Debian (aarch64).
#
#   tools/board/make_dist.sh [--bundle DIR]... [--python-versions "3.11 3.13"] [--out dist]
#
# The archive holds everything a board needs, with no internet there:
#   wheels/    the fillmask-edge wheel (with the embedded default bundle when
#              edge/default_bundle/ exists) and manylinux aarch64 wheels of every
#              runtime dependency for CPython 3.11 (Bookworm) and 3.13 (Trixie),
#              plus pip itself (the venv is made --without-pip: no python3-venv needed)
#   bundles/   extra bundles given with --bundle (each verified before packing)
#   systemd/   the units and the /etc/default/fillmask-edge settings file
#   install.sh, uninstall.sh, README.md, BUILD-INFO, SHA256SUMS
# Needs PyPI (pip download) on the build machine only. Prints the archive's path,
# size and contents. Wheels are for glibc <= 2.36 (Bookworm), so they also suit
# Trixie; 32-bit (armhf) Pi OS is not supported (no onnxruntime wheels).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
OUT=$ROOT/dist
PYVERS="3.11 3.13"
BUNDLES=()
GLIBC_MAX=36  # Debian 12 / Pi OS Bookworm ship glibc 2.36

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "make_dist: error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) [ $# -ge 2 ] || die "--bundle needs a folder"; BUNDLES+=("$2"); shift 2 ;;
        --python-versions) [ $# -ge 2 ] || die "--python-versions needs a list"; PYVERS=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
VERSION=$("$PYTHON" -c 'import edge; print(edge.__version__)')
NAME=fillmask-edge-$VERSION-linux-aarch64
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/$NAME
mkdir -p "$STAGE/wheels" "$STAGE/systemd"

step() { echo "==> $*"; }

# 1. Bundles: verify sizes and sha256 against each manifest before packing.
verify_bundle() {
    "$PYTHON" -c 'import sys; from edge.bundle import load_bundle; b = load_bundle(sys.argv[1]); print(f"    {sys.argv[1]}: {b.manifest.name}, random_init={b.manifest.random_init}")' "$1" \
        || die "bundle $1 does not verify (see above)"
}
EMBEDDED=no
if [ -f "$ROOT/edge/default_bundle/manifest.json" ]; then
    step "verifying the embedded default bundle"
    verify_bundle "$ROOT/edge/default_bundle"
    EMBEDDED=yes
fi
for bundle in "${BUNDLES[@]+"${BUNDLES[@]}"}"; do
    [ -f "$bundle/manifest.json" ] || die "$bundle: no manifest.json (is this a bundle folder?)"
    step "verifying bundle $bundle"
    verify_bundle "$bundle"
    target=$STAGE/bundles/$(basename "$(cd "$bundle" && pwd)")
    [ -e "$target" ] && die "two bundles named $(basename "$target")"
    mkdir -p "$target"
    # The manifest and every file it lists (model, tokenizer; word LM, phrase memory and their licenses).
    cp "$bundle"/manifest.json "$target"/
    for name in $("$PYTHON" -c 'import sys; from edge.manifest import Manifest; print("\n".join(Manifest.load(sys.argv[1]).files))' "$bundle"); do
        cp "$bundle/$name" "$target/"
    done
done
if [ "$EMBEDDED" = no ] && [ ${#BUNDLES[@]} -eq 0 ]; then
    die "no model to ship: edge/default_bundle/ is missing (build it with 'make model ...') and no --bundle DIR was given"
fi

# 2. The package wheel, built from a clean copy of the sources: setuptools' build/
#    folder in the tree could carry files that were deleted since.
step "building the fillmask-edge wheel"
SRC=$WORK/src
mkdir -p "$SRC"
for item in pyproject.toml README.md LICENSE edge tools; do
    [ -e "$ROOT/$item" ] && cp -r "$ROOT/$item" "$SRC/"
done
find "$SRC" -name __pycache__ -prune -exec rm -rf {} +
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$STAGE/wheels" "$SRC" \
    || "$PYTHON" -m pip wheel -q --no-deps -w "$STAGE/wheels" "$SRC"
WHEEL=$(ls "$STAGE"/wheels/fillmask_edge-*.whl)
if [ "$EMBEDDED" = yes ]; then
    # Every file the embedded bundle's manifest lists must be in the wheel.
    "$PYTHON" -c 'import sys, zipfile; from edge.manifest import Manifest; names = set(zipfile.ZipFile(sys.argv[1]).namelist()); missing = [f for f in ["manifest.json", *Manifest.load(sys.argv[2]).files] if "edge/default_bundle/" + f not in names]; sys.exit("the wheel lacks edge/default_bundle/" + ", ".join(missing) if missing else 0)' "$WHEEL" "$ROOT/edge/default_bundle"
fi

# 3. Dependency wheels for each target Python, manylinux aarch64 up to glibc 2.36.
PLATFORMS=(--platform manylinux2014_aarch64)
for minor in $(seq 17 $GLIBC_MAX); do PLATFORMS+=(--platform "manylinux_2_${minor}_aarch64"); done
for version in $PYVERS; do
    step "downloading aarch64 wheels for CPython $version"
    "$PYTHON" -m pip download -q --only-binary=:all: --implementation cp --python-version "$version" \
        "${PLATFORMS[@]}" -d "$STAGE/wheels" "$WHEEL"
done
step "downloading pip (to install into a venv made without pip)"
"$PYTHON" -m pip download -q --only-binary=:all: --no-deps -d "$STAGE/wheels" pip

# 4. Units, settings, scripts, docs.
cp "$ROOT"/systemd/*.service "$ROOT"/systemd/fillmask-edge.default "$STAGE/systemd/"
install -m 0755 "$ROOT/tools/board/install.sh" "$ROOT/tools/board/uninstall.sh" "$STAGE/"
[ -f "$ROOT/README.md" ] && cp "$ROOT/README.md" "$STAGE/"
{
    echo "name: fillmask-edge"
    echo "version: $VERSION"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "python: $PYVERS"
    echo "platform: manylinux aarch64, glibc <= 2.$GLIBC_MAX"
    echo "embedded_default_bundle: $EMBEDDED"
    echo "bundles: $(ls "$STAGE/bundles" 2>/dev/null | tr '\n' ' ')"
} > "$STAGE/BUILD-INFO"
(cd "$STAGE" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort | xargs -d '\n' sha256sum > SHA256SUMS)

# 5. The archive.
ARCHIVE=$OUT/$NAME.tar.gz
step "writing $ARCHIVE"
tar -C "$WORK" --owner=0 --group=0 -czf "$ARCHIVE" "$NAME"

echo
echo "archive: $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1), $(stat -c %s "$ARCHIVE") bytes)"
echo "contents (unpacked sizes):"
# bundles/ exists only when --bundle added extra ones (the default is inside the wheel).
(cd "$STAGE" && for d in wheels systemd bundles; do if [ -e "$d" ]; then du -sh "$d"; fi; done | sed 's/^/  /')
echo "  wheels:"
(cd "$STAGE/wheels" && ls -1 | sed 's/^/    /')
