#!/bin/sh
# Install fillmask-edge from this unpacked archive, with no internet access.
#
#   sudo ./install.sh [--serial ttyUSB0]... [--kiosk] [--bundle NAME] [--no-start]
#
#   --serial DEV   also enable fillmask-edge-serial@DEV.service (repeatable)
#   --kiosk        also enable the kiosk display unit (needs cage, chromium, xwayland
#                  and polkitd; brings the CJK and emoji fonts with apt if they are missing)
#   --bundle NAME  serve bundles/NAME from this archive instead of the embedded model
#   --no-start     install and enable, but do not start anything (also in a chroot
#                  without systemd running, e.g. building an SD-card image)
#
# What it does: checks SHA256SUMS; creates a venv in /opt/fillmask-edge/venv from
# the archive's wheels only (pip --no-index); copies bundles to
# /opt/fillmask-edge/bundles; installs the units into /etc/systemd/system and the
# settings into /etc/default/fillmask-edge (an existing one is kept, the new one is
# left beside it as .dist); reloads systemd, enables and starts the service and
# waits for /healthz. Where systemd is not running (a chroot, a container) it
# installs the files and checks the runtime with one prediction instead (and with
# --no-start enables the units offline).
# Undo with /opt/fillmask-edge/uninstall.sh.
set -eu

PREFIX=/opt/fillmask-edge
UNIT_DIR=/etc/systemd/system
DEFAULTS=/etc/default/fillmask-edge
KIOSK_USER=fillmask-kiosk
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)

SERIALS=""
KIOSK=no
BUNDLE=""
START=yes

die() { echo "install: error: $*" >&2; exit 2; }
step() { echo "==> $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --serial) [ $# -ge 2 ] || die "--serial needs a device name such as ttyUSB0"
                  SERIALS="$SERIALS ${2#/dev/}"; shift 2 ;;
        --kiosk) KIOSK=yes; shift ;;
        --bundle) [ $# -ge 2 ] || die "--bundle needs a name from bundles/"; BUNDLE=$2; shift 2 ;;
        --no-start) START=no; shift ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "run as root (sudo $0)"
ARCH=$(uname -m)
[ "$ARCH" = aarch64 ] || die "this archive is for 64-bit ARM (aarch64); this machine is $ARCH (32-bit Pi OS is not supported)"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (apt install python3)"
TAG=$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
ls "$HERE"/wheels/onnxruntime-*-"$TAG"-*.whl >/dev/null 2>&1 \
    || die "no wheels for Python $TAG in $HERE/wheels (this archive has: $(ls "$HERE"/wheels/onnxruntime-* | sed 's/.*-\(cp3[0-9]*\)-.*/\1/' | tr '\n' ' '))"
if [ -n "$BUNDLE" ]; then
    [ -f "$HERE/bundles/$BUNDLE/manifest.json" ] || die "no bundle $BUNDLE in $HERE/bundles (have: $(ls "$HERE/bundles" 2>/dev/null | tr '\n' ' '))"
fi

step "checking the archive (SHA256SUMS)"
(cd "$HERE" && sha256sum --quiet -c SHA256SUMS) || die "the archive is damaged: copy it again"

SYSTEMD=no
[ -d /run/systemd/system ] && SYSTEMD=yes
WAS_RUNNING=""
if [ "$SYSTEMD" = yes ]; then
    # An upgrade: stop the old version before its venv is replaced; the serial and
    # kiosk units that ran (e.g. set up by the SD image's fillmask.txt) start again below.
    WAS_RUNNING=$(systemctl list-units --plain --no-legend --state=active \
        'fillmask-edge-serial@*.service' fillmask-edge-kiosk.service 2>/dev/null | awk '{print $1}' | tr '\n' ' ')
    systemctl stop fillmask-edge.service 'fillmask-edge-serial@*.service' fillmask-edge-kiosk.service 2>/dev/null || true
fi

step "creating $PREFIX/venv (Python $TAG, offline)"
mkdir -p "$PREFIX"
rm -rf "$PREFIX/venv"
# --without-pip: works without Debian's python3-venv package; pip runs from its wheel.
"$PYTHON" -m venv --without-pip "$PREFIX/venv"
PIP_WHEEL=$(ls "$HERE"/wheels/pip-*.whl | tail -n 1)
"$PREFIX/venv/bin/python" "$PIP_WHEEL/pip" install --quiet --isolated --no-index --no-cache-dir \
    --disable-pip-version-check --find-links "$HERE/wheels" fillmask-edge

if [ -d "$HERE/bundles" ]; then
    step "copying bundles to $PREFIX/bundles"
    rm -rf "$PREFIX/bundles"
    cp -r "$HERE/bundles" "$PREFIX/bundles"
fi
install -m 0644 "$HERE/README.md" "$PREFIX/README.md" 2>/dev/null || true
install -m 0755 "$HERE/uninstall.sh" "$PREFIX/uninstall.sh"
# The services run as throw-away users: everything must be world-readable.
chmod -R a+rX "$PREFIX"

step "installing units into $UNIT_DIR and settings into $DEFAULTS"
mkdir -p "$UNIT_DIR"
for unit in "$HERE"/systemd/*.service; do
    install -m 0644 "$unit" "$UNIT_DIR/"
done
EMBEDDED=$("$PREFIX/venv/bin/python" -c 'from edge.bundle import default_bundle_path as p; print("yes" if (p() / "manifest.json").is_file() else "no")')
if [ -z "$BUNDLE" ] && [ "$EMBEDDED" = no ] && [ -d "$HERE/bundles" ]; then
    BUNDLE=$(ls "$HERE/bundles" | head -n 1)  # no embedded model: serve the shipped one
fi
NEW_DEFAULTS=$(mktemp)
sed "s|^FILLMASK_BUNDLE=.*|FILLMASK_BUNDLE=${BUNDLE:+$PREFIX/bundles/$BUNDLE}|" "$HERE/systemd/fillmask-edge.default" > "$NEW_DEFAULTS"
if [ -f "$DEFAULTS" ] && ! cmp -s "$DEFAULTS" "$NEW_DEFAULTS"; then
    install -m 0644 "$NEW_DEFAULTS" "$DEFAULTS.dist"
    echo "    kept your $DEFAULTS; the new defaults are in $DEFAULTS.dist"
else
    install -m 0644 "$NEW_DEFAULTS" "$DEFAULTS"
fi
rm -f "$NEW_DEFAULTS"

if [ "$KIOSK" = yes ] && ! id "$KIOSK_USER" >/dev/null 2>&1; then
    step "creating the $KIOSK_USER user for the kiosk display"
    useradd --system --create-home --home-dir "/var/lib/$KIOSK_USER" --shell /usr/sbin/nologin \
        --groups "$(for g in video render input; do getent group $g >/dev/null && printf '%s,' $g; done | sed 's/,$//')" \
        "$KIOSK_USER"
fi

# The kiosk page is Chinese with emoji: without a CJK and an emoji font Chromium
# draws boxes. Debian / Pi OS packages; where apt cannot reach a mirror, say so.
if [ "$KIOSK" = yes ]; then
    FONTS_MISSING=""
    for pkg in fonts-wqy-microhei fonts-noto-color-emoji; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || FONTS_MISSING="$FONTS_MISSING $pkg"
    done
    if [ -n "$FONTS_MISSING" ]; then
        step "installing the kiosk page's fonts:$FONTS_MISSING"
        if ! { command -v apt-get >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $FONTS_MISSING; }; then
            echo "    warning: could not install$FONTS_MISSING: the kiosk page shows boxes for Chinese text and emoji; later: sudo apt install$FONTS_MISSING"
        fi
    fi
fi

# Settings as the services will see them (for the health check below).
PORT=$(sed -n 's/^FILLMASK_PORT=//p' "$DEFAULTS" | tail -n 1)
PORT=${PORT:-8000}
UNITS="fillmask-edge.service"
for dev in $SERIALS; do UNITS="$UNITS fillmask-edge-serial@$dev.service"; done
[ "$KIOSK" = yes ] && UNITS="$UNITS fillmask-edge-kiosk.service"

if [ "$SYSTEMD" = no ]; then
    step "systemd is not running here: units installed but not enabled; checking the runtime directly"
    BUNDLE_NOW=$(sed -n 's/^FILLMASK_BUNDLE=//p' "$DEFAULTS" | tail -n 1)
    "$PREFIX/venv/bin/python" -m edge predict ${BUNDLE_NOW:+--bundle "$BUNDLE_NOW"} "床前明月光，疑是地[MASK]霜。"
    if [ "$START" = no ] && command -v systemctl >/dev/null; then
        # e.g. building a card image in a chroot: enable offline, start at boot.
        step "enabling $UNITS (offline)"
        systemctl enable $UNITS
        echo "installed and enabled: they start at the next boot"
    else
        echo "installed (enable later with: systemctl enable --now $UNITS)"
    fi
    exit 0
fi

systemctl daemon-reload
step "enabling $UNITS"
systemctl enable $UNITS
if [ "$START" = no ]; then
    echo "installed; start with: systemctl start $UNITS $WAS_RUNNING"
    exit 0
fi
systemctl restart $UNITS
if [ -n "$WAS_RUNNING" ]; then
    step "starting again what ran before: $WAS_RUNNING"
    systemctl start $WAS_RUNNING || echo "    warning: could not start all of $WAS_RUNNING"
fi

step "waiting for http://127.0.0.1:$PORT/healthz"
if "$PREFIX/venv/bin/python" - "$PORT" <<'EOF'
import json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}"
for attempt in range(90):
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as reply:
            if reply.status == 200:
                break
    except OSError:
        time.sleep(1)
else:
    sys.exit("no answer from /healthz after 90 s")
body = json.dumps({"text": "床前明月光，疑是地[MASK]霜。", "top_k": 3}).encode()
request = urllib.request.Request(url + "/api/predict", body, {"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=30) as reply:
        answer = json.load(reply)
except OSError as exc:  # e.g. 401 when an API token is set: the service is up
    print(f"service is up; test prediction not run: {exc}")
else:
    best = ", ".join(f"{c['text']} {c['score']:.0%}" for c in answer["blanks"][0]["candidates"])
    print(f"service is up: 床前明月光，疑是地[MASK]霜。 -> {best}  ({answer['elapsed_ms']} ms)")
EOF
then
    echo "installed and running: http://127.0.0.1:$PORT/ (logs: journalctl -u fillmask-edge)"
else
    systemctl --no-pager status fillmask-edge.service || true
    journalctl --no-pager -n 30 -u fillmask-edge.service || true
    die "the service did not come up (see the log above)"
fi
