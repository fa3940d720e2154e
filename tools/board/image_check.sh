#!/usr/bin/env bash
# Boot the Raspberry Pi image under qemu-system-aarch64 and check the live system.
#
#   sudo tools/board/image_check.sh [--image dist/fillmask-edge-*-rpi-arm64.img.xz]
#                                   [--kiosk] [--boot-timeout 1500] [--smp 2] [--keep]
#
# The image's own kernel and initrd (from its FAT partition) on qemu's "virt"
# machine, cortex-a72 (the Pi 4's core), TCG only (no KVM). The card is a copy of
# the image made 1 GiB larger (a bigger card: the first boot must grow the root).
# Before booting, fillmask.txt on the copy's FAT partition gets: hostname, lan = on,
# an API token, serial = usb ttyAMA0 (the virt machine's PL011 UART, the Pi's UART
# driver, group dialout as on a board; its other end is a pty on this machine; the
# kernel console moves to a virtio console, hvc0, logged to a file) and an SSH key
# made for this run. Every port is forwarded to 127.0.0.1
# only. Checks (each timed, each can fail):
#   boot-to-first-answer; HTTP unit active; /healthz; /api/predict refused without
#   the token and equal to x86's answer (.venv python -m edge predict --json here)
#   with it; hardening live (systemctl show: DynamicUser, ProtectSystem,
#   SystemCallFilter; the process's uid and Seccomp mode; systemd-analyze security
#   <= 2.5); the serial unit answering a query typed into the pty; the settings
#   applied (hostname, token, LAN bind, SSH key, report file); first boot (root
#   grown, machine-id, SSH host keys); no error lines from our units in the journal;
#   then a bad value is written into fillmask.txt and the board rebooted: it comes
#   back serving, the bad value is reported in the journal, the rest applied.
# With --kiosk (the -kiosk image), the virt machine also gets a display (virtio-gpu),
# a keyboard and a tablet (PCI), and the kiosk is checked live: its unit active and not
# restarting (once at most: its fallback from the GPU to software rendering, which
# qemu's virtio-gpu without 3D needs); cage and Chromium running as fillmask-kiosk on
# http://127.0.0.1:8000/;
# the page fetched and its script answered by the API with the token (the service's own
# request counters: /api/info 200); the page
# on the display: a screenshot taken through qemu's QMP (screendump) shows the page's
# indigo header over its background (not a console, a blank screen or Chromium's
# error page), kept as kiosk-screen.png; the fonts for its Chinese text and emoji
# known to fontconfig; the kiosk active again after the reboot.
# Exit status 0 only if every check passed. Logs in /var/tmp/fillmask-image-check/.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
IMAGE=""
BOOT_TIMEOUT=1500
SMP=2
KEEP=no
VARIANT=""
WORK=/var/tmp/fillmask-image-check
HOST_PYTHON=${PYTHON:-$REPO/.venv/bin/python}
QUERY="床前明月光，疑是地[MASK]霜。"
TOLERANCE=0.02

die() { echo "image_check: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --image) [ $# -ge 2 ] || die "--image needs a file"; IMAGE=$(realpath "$2"); shift 2 ;;
        --boot-timeout) BOOT_TIMEOUT=$2; shift 2 ;;
        --smp) SMP=$2; shift 2 ;;
        --keep) KEEP=yes; shift ;;
        --kiosk) VARIANT=-kiosk; shift ;;
        -h|--help) sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "needs root (apt-get for missing tools; the card copy in /var/tmp)"
[ -x "$HOST_PYTHON" ] || die "no $HOST_PYTHON (make venv-dev): the x86 reference answer comes from it"
if [ -z "$IMAGE" ]; then
    IMAGE=$(ls -t "$REPO"/dist/fillmask-edge-*-rpi-arm64$VARIANT.img.xz 2>/dev/null | head -n 1 || true)
    [ -n "$IMAGE" ] || die "no dist/fillmask-edge-*-rpi-arm64$VARIANT.img.xz: run make image${VARIANT:+ KIOSK=1} first"
fi
[ -f "$IMAGE" ] || die "no image at $IMAGE"

START=$(date +%s)
LAST=$START
step() { echo; echo "==> [$(( $(date +%s) - START ))s] $*"; }
lap() { local now; now=$(date +%s); echo "    ($(( now - LAST ))s)"; LAST=$now; }
PASSED=()
FAILED=()
pass() { PASSED+=("$1"); echo "    PASS $1${2:+: $2}"; }
fail() { FAILED+=("$1"); echo "    FAIL $1${2:+: $2}"; }
check() {  # check NAME CONDITION-COMMAND... (DETAIL from $DETAIL)
    local name=$1; shift
    if "$@"; then pass "$name" "${DETAIL:-}"; else fail "$name" "${DETAIL:-}"; fi
    DETAIL=""
}
DETAIL=""
KIOSK_TIMEOUT=900  # seconds from qemu's start for the kiosk page to be on the display

# -- host tools ------------------------------------------------------------------------
step "host tools"
missing=()
command -v qemu-system-aarch64 >/dev/null || missing+=(qemu-system-arm)
command -v ssh >/dev/null || missing+=(openssh-client)
command -v curl >/dev/null || missing+=(curl)
command -v sfdisk >/dev/null || missing+=(fdisk)
command -v mcopy >/dev/null || missing+=(mtools)
if [ ${#missing[@]} -gt 0 ]; then
    echo "    installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "    $(qemu-system-aarch64 --version | head -n 1)"
lap

QEMU_PID=""
cleanup() {
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill "$QEMU_PID" 2>/dev/null || true
        sleep 2
        kill -9 "$QEMU_PID" 2>/dev/null || true
    fi
    [ -n "${PTY_PID:-}" ] && kill "$PTY_PID" 2>/dev/null || true
    if [ "$KEEP" = no ] && [ -n "${CARD:-}" ]; then rm -f "$CARD"; fi
    return 0
}
trap cleanup EXIT

# -- the card: a copy of the image, larger, with test settings ------------------------------------
step "the card: $(basename "$IMAGE") unpacked, 1 GiB larger"
mkdir -p "$WORK"
rm -f "$WORK/known_hosts"  # a new image has new host keys
CARD=$WORK/card.img
rm -f "$CARD"
nice -n 19 xz -dc "$IMAGE" | dd of="$CARD" bs=4M conv=sparse status=none
IMAGE_BYTES=$(stat -c %s "$CARD")
truncate -s $(( IMAGE_BYTES + 1024 * 1024 * 1024 )) "$CARD"
read -r BSTART BSIZE < <(sfdisk -d "$CARD" | sed -n "s|^${CARD}1 : start= *\([0-9]*\), size= *\([0-9]*\).*|\1 \2|p")
read -r RSTART RSIZE < <(sfdisk -d "$CARD" | sed -n "s|^${CARD}2 : start= *\([0-9]*\), size= *\([0-9]*\).*|\1 \2|p")
[ -n "$BSTART" ] && [ -n "$RSTART" ] || die "$IMAGE has no two-partition MBR (sfdisk -d shows: $(sfdisk -d "$CARD" | tail -n 2 | tr '\n' ' '))"
ROOT_PART_BYTES=$(( RSIZE * 512 ))
echo "    image $(( IMAGE_BYTES / 1048576 )) MiB, root partition $(( ROOT_PART_BYTES / 1048576 )) MiB; card $(( $(stat -c %s "$CARD") / 1048576 )) MiB"

ssh-keygen -q -t ed25519 -N '' -C fillmask-image-check -f "$WORK/id_ed25519" <<< y >/dev/null 2>&1 || true
[ -f "$WORK/id_ed25519.pub" ] || die "ssh-keygen failed"
TOKEN=check-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
# The FAT partition through mtools (no vfat driver needed on this machine).
export MTOOLS_SKIP_CHECK=1
FAT="$CARD@@$(( BSTART * 512 ))"
mdir -i "$FAT" -b ::/ > "$WORK/boot-files.txt" || die "cannot read the boot partition of $IMAGE"
grep -qx '::/fillmask.txt' "$WORK/boot-files.txt" || die "no fillmask.txt on the boot partition of $IMAGE"
KERNEL=$(sed -n 's|^::/\(vmlinuz-.*\)|\1|p' "$WORK/boot-files.txt" | sort -V | tail -n 1)
[ -n "$KERNEL" ] || die "no vmlinuz-* on the boot partition of $IMAGE"
INITRD=initrd.img-${KERNEL#vmlinuz-}
mcopy -n -i "$FAT" "::/$KERNEL" "$WORK/vmlinuz"
mcopy -n -i "$FAT" "::/$INITRD" "$WORK/initrd.img" || die "no $INITRD beside $KERNEL on the boot partition"
mcopy -n -i "$FAT" ::/fillmask.txt "$WORK/fillmask.txt.orig"
mcopy -n -i "$FAT" ::/cmdline.txt "$WORK/cmdline.txt"
sed -e 's/^hostname = .*/hostname = imagecheck/' -e 's/^lan = .*/lan = on/' \
    -e "s/^api_token =.*/api_token = $TOKEN/" -e 's/^serial = .*/serial = usb ttyAMA0/' \
    -e "s|^ssh_key =.*|ssh_key = $(cat "$WORK/id_ed25519.pub")|" "$WORK/fillmask.txt.orig" > "$WORK/fillmask.txt"
mcopy -o -i "$FAT" "$WORK/fillmask.txt" ::/fillmask.txt
{ diff "$WORK/fillmask.txt.orig" "$WORK/fillmask.txt" || true; } | sed -n 's/^> /    fillmask.txt: /p' | sed "s/$TOKEN/<token>/"
echo "    $KERNEL; cmdline.txt on the card (for the Pi): $(cat "$WORK/cmdline.txt")"
lap

# -- the x86 reference answer -----------------------------------------------------------------
step "x86 reference: $HOST_PYTHON -m edge predict --json '$QUERY'"
(cd "$REPO" && nice -n 19 "$HOST_PYTHON" -m edge predict --json --threads 1 "$QUERY") > "$WORK/x86.json" \
    || die "the x86 prediction failed"
"$HOST_PYTHON" -c 'import json,sys; b=json.load(open(sys.argv[1]))["blanks"][0]["candidates"]; print("    " + ", ".join("%s %.4f" % (c["text"], c["score"]) for c in b))' "$WORK/x86.json"
TOP=$("$HOST_PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["blanks"][0]["candidates"][0]["text"])' "$WORK/x86.json")
lap

# -- boot ------------------------------------------------------------------------------------
free_port() { "$HOST_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
HTTP_PORT=$(free_port); SSH_PORT=$(free_port)
while [ "$SSH_PORT" = "$HTTP_PORT" ]; do SSH_PORT=$(free_port); done
# The kiosk image gets a display, keyboard and tablet (virtio), and QMP for screenshots.
KIOSK_DEVICES=()
if [ "$VARIANT" = -kiosk ]; then
    rm -f "$WORK/qmp.sock" "$WORK"/kiosk-screen.*
    # PCI, not MMIO: qemu's virtio-mmio devices are legacy (virtio 0.9), and Linux's
    # virtio-gpu and virtio-input drivers need virtio 1.0 (on MMIO their probe fails).
    KIOSK_DEVICES=(-device virtio-gpu-pci -device virtio-keyboard-pci -device virtio-tablet-pci
                   -qmp "unix:$WORK/qmp.sock,server=on,wait=off")
fi
# The kernel console on hvc0 (virtio, to a file): ttyAMA0 belongs to the serial unit.
APPEND="root=LABEL=RASPIROOT rw rootwait fsck.repair=yes net.ifnames=0 console=hvc0"
step "booting: qemu-system-aarch64 -M virt -cpu cortex-a72 -smp $SMP -m 2048 (TCG), http 127.0.0.1:$HTTP_PORT, ssh 127.0.0.1:$SSH_PORT"
: > "$WORK/console.log"
BOOT_T0=$(date +%s.%N)
# Bounded even if this script is killed: qemu lives at most 3 boot timeouts.
nice -n 10 timeout $(( BOOT_TIMEOUT * 3 )) qemu-system-aarch64 -M virt -cpu cortex-a72 -smp "$SMP" -m 2048 -accel tcg,thread=multi \
    -kernel "$WORK/vmlinuz" -initrd "$WORK/initrd.img" -append "$APPEND" \
    -drive if=none,file="$CARD",format=raw,id=card -device virtio-blk-device,drive=card \
    -netdev user,id=net0,hostfwd=tcp:127.0.0.1:$HTTP_PORT-:8000,hostfwd=tcp:127.0.0.1:$SSH_PORT-:22 \
    -device virtio-net-device,netdev=net0 -device virtio-rng-device \
    -device virtio-serial-device -chardev file,id=con,path="$WORK/console.log" -device virtconsole,chardev=con \
    -chardev pty,id=term -serial chardev:term -display none -monitor none "${KIOSK_DEVICES[@]}" \
    > "$WORK/qemu.log" 2>&1 &
QEMU_PID=$!
PTY=""
for _ in $(seq 30); do
    PTY=$(sed -n 's|.*char device redirected to \(/dev/pts/[0-9]*\) (label term).*|\1|p' "$WORK/qemu.log")
    [ -n "$PTY" ] && break
    kill -0 "$QEMU_PID" 2>/dev/null || { cat "$WORK/qemu.log"; die "qemu exited at once (see above)"; }
    sleep 1
done
[ -n "$PTY" ] || die "qemu did not say which pty the UART is on ($WORK/qemu.log)"
echo "    UART ttyAMA0 (PL011) <-> $PTY on this machine; guest console (hvc0) log: $WORK/console.log"
# Keep the pty's host end open (and drained) until the check types into it.
"$HOST_PYTHON" - "$PTY" "$WORK/ttyAMA0-boot.log" <<'EOF' &
import os, sys, termios, tty, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY)
tty.setraw(fd)
with open(sys.argv[2], "ab") as log:
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            time.sleep(0.5)
            continue
        log.write(data); log.flush()
EOF
PTY_PID=$!

curl_api() { curl -sS -m 60 -o "$WORK/reply.json" -w '%{http_code}' "$@" 2>>"$WORK/curl.log" || true; }
predict() {  # predict [TOKEN] -> HTTP status; body in reply.json
    local auth=()
    [ -n "${1:-}" ] && auth=(-H "Authorization: Bearer $1")
    curl_api -H 'Content-Type: application/json' "${auth[@]}" \
        --data "{\"text\": \"$QUERY\", \"top_k\": 5}" "http://127.0.0.1:$HTTP_PORT/api/predict"
}
wait_answer() {  # wait_answer T0 TIMEOUT -> sets ANSWER_S; 1 on timeout
    local t0=$1 limit=$2 code
    while :; do
        kill -0 "$QEMU_PID" 2>/dev/null || { echo "    qemu exited"; return 1; }
        code=$(predict "$TOKEN")
        if [ "$code" = 200 ]; then
            ANSWER_S=$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { printf "%.1f", a - b }')
            return 0
        fi
        awk -v a="$(date +%s.%N)" -v b="$t0" -v l="$limit" 'BEGIN { exit !(a - b > l) }' && return 1
        sleep 3
    done
}
step "waiting (at most ${BOOT_TIMEOUT}s) for the first answer from /api/predict"
PROGRESS_PID=""
( while sleep 60; do echo "    ... $(( $(date +%s) - ${BOOT_T0%.*} ))s: $(grep -a -o '[A-Za-z].*' "$WORK/console.log" | tail -n 1 | cut -c1-100)"; done ) &
PROGRESS_PID=$!
if wait_answer "$BOOT_T0" "$BOOT_TIMEOUT"; then
    kill "$PROGRESS_PID" 2>/dev/null || true
    FIRST_ANSWER=$ANSWER_S
    pass "boot to first answer" "$(printf '%.0f' "$FIRST_ANSWER") s (qemu start to the first 200 from /api/predict, TCG, -smp $SMP)"
else
    kill "$PROGRESS_PID" 2>/dev/null || true
    fail "boot to first answer" "no answer within ${BOOT_TIMEOUT}s"
    echo "    last console lines:"; grep -a -v '^\s*$' "$WORK/console.log" | tail -n 30 | sed 's/^/      /'
    exit 1
fi
lap

SSH=(ssh -q -i "$WORK/id_ed25519" -p "$SSH_PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile="$WORK/known_hosts"
     -o ConnectTimeout=20 -o ServerAliveInterval=10 -o BatchMode=yes root@127.0.0.1)
guest() { timeout 300 "${SSH[@]}" "$1"; }  # one command line, run by the guest's shell

# -- live checks --------------------------------------------------------------------------------
# verdict NAME DETAIL: pass or fail by the status of the test just before it.
verdict() { local rc=$?; if [ $rc = 0 ]; then pass "$1" "${2:-}"; else fail "$1" "${2:-}"; fi; }
has() { printf '%s\n' "$1" | grep -qE "$2"; }
step "checks on the running board"
# From here a failed check is counted, not fatal.
set +e
guest true; verdict "SSH with the key from fillmask.txt (ssh_key)" "ssh -p $SSH_PORT root@127.0.0.1"
ACTIVE=$(guest "systemctl is-active fillmask-edge.service" || true)
[ "$ACTIVE" = active ]; verdict "HTTP unit active" "systemctl is-active fillmask-edge.service -> $ACTIVE"
CODE=$(curl_api "http://127.0.0.1:$HTTP_PORT/healthz")
BODY=$(head -c 100 "$WORK/reply.json")
[ "$CODE" = 200 ]; verdict "/healthz" "GET /healthz -> $CODE $BODY"
CODE=$(predict "")
[ "$CODE" = 401 ]; verdict "token required (api_token from fillmask.txt)" "POST /api/predict without the token -> $CODE"
CODE=$(predict "$TOKEN")
cp "$WORK/reply.json" "$WORK/arm.json"
COMPARE=$("$HOST_PYTHON" - "$WORK/x86.json" "$WORK/arm.json" "$TOLERANCE" <<'EOF'
import json, sys
a = json.load(open(sys.argv[1]))["blanks"]
b = json.load(open(sys.argv[2]))["blanks"]
tol = float(sys.argv[3])
ca, cb = a[0]["candidates"], b[0]["candidates"]
ta, tb = [c["text"] for c in ca], [c["text"] for c in cb]
sa, sb = {c["text"]: c["score"] for c in ca}, {c["text"]: c["score"] for c in cb}
# The same candidates with the same scores (within tol): a candidate in one top-5 only
# must score below tol (a near-tie at the cut-off); swaps between near-equal
# scores are within tol (INT8 kernels differ by CPU, as in make arm-check).
diff = max(abs(sa.get(t, 0.0) - sb.get(t, 0.0)) for t in set(ta) | set(tb))
shown = ", ".join("%s %.4f" % (c["text"], c["score"]) for c in cb)
same = "identical" if ta == tb else "x86 " + ", ".join(ta)
ok = ta[0] == tb[0] and diff <= tol
print(f"board: {shown}; top-5 {same}, top-1 {'same' if ta[0] == tb[0] else 'DIFFERENT'}, max |score diff| {diff:.2e}")
sys.exit(0 if ok else 1)
EOF
); verdict "prediction equal to x86 (tolerance $TOLERANCE)" "HTTP $CODE; $COMPARE"

SHOW=$(guest "systemctl show fillmask-edge.service -p DynamicUser -p ProtectSystem -p NoNewPrivileges -p PrivateDevices -p SystemCallFilter -p MainPID" || true)
printf '%s\n' "$SHOW" | cut -c1-100 | sed 's/^/      /'
SHOWN=$(printf '%s\n' "$SHOW" | grep -E '^(DynamicUser|ProtectSystem)=' | tr '\n' ' ')
has "$SHOW" '^DynamicUser=yes$' && has "$SHOW" '^ProtectSystem=strict$'
verdict "hardening: DynamicUser=yes, ProtectSystem=strict" "$SHOWN"
NCALLS=$(printf '%s\n' "$SHOW" | sed -n 's/^SystemCallFilter=//p' | wc -w)
[ "$NCALLS" -gt 50 ]; verdict "hardening: SystemCallFilter in effect" "$NCALLS system calls in the allow-list"
MAINPID=$(printf '%s\n' "$SHOW" | sed -n 's/^MainPID=//p')
PROC=$(guest "awk '/^(Uid|Seccomp|NoNewPrivs|CapEff):/ {printf \"%s %s \", \$1, \$2}' /proc/$MAINPID/status" || true)
PUID=$(printf '%s\n' "$PROC" | awk '{print $2}')
has "$PROC" 'Seccomp: 2' && has "$PROC" 'NoNewPrivs: 1' && has "$PROC" 'CapEff: 0+ ' && [ "${PUID:-0}" -ge 61184 ]
verdict "hardening live in the process (dynamic uid, seccomp, no capabilities)" "pid $MAINPID: $PROC"
EXPOSURE=$(guest "systemd-analyze security --no-pager fillmask-edge.service" 2>/dev/null | sed -n 's/.*Overall exposure level for fillmask-edge.service: \([0-9.]*\).*/\1/p' || true)
[ -n "$EXPOSURE" ] && awk -v e="$EXPOSURE" 'BEGIN { exit !(e <= 2.5) }'
verdict "systemd-analyze security <= 2.5 (live)" "systemd-analyze security fillmask-edge.service -> ${EXPOSURE:-nothing}"

# Serial: the unit on ttyAMA0, a query typed into this machine's end of the pty.
SERIAL_ACTIVE=$(guest "systemctl is-active fillmask-edge-serial@ttyAMA0.service" || true)
SERIAL_WHO=$(guest 'p=$(systemctl show -p MainPID --value fillmask-edge-serial@ttyAMA0.service); grep -E "^(Uid|Groups):" /proc/$p/status | tr -s "\t\n" "  "' || true)
[ "$SERIAL_ACTIVE" = active ]
verdict "serial unit active on ttyAMA0 (serial = usb ttyAMA0 in fillmask.txt)" "$SERIAL_ACTIVE; $SERIAL_WHO (dialout is 20)"
kill "$PTY_PID" 2>/dev/null || true; wait "$PTY_PID" 2>/dev/null || true; PTY_PID=""
SERIAL_OUT=$("$HOST_PYTHON" - "$PTY" "$QUERY" "$TOP" "$WORK/ttyAMA0.log" <<'EOF'
import os, re, select, sys, time, tty
fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY)
tty.setraw(fd)
query, top = sys.argv[2], sys.argv[3]
t0 = time.time()
os.write(fd, b"\r")  # a fresh prompt
time.sleep(2)
os.write(fd, query.encode() + b"\r")
buf = b""
while time.time() - t0 < 120:
    ready, _, _ = select.select([fd], [], [], 1)
    if ready:
        buf += os.read(fd, 4096)
        text = buf.decode("utf-8", "replace")
        after = text.split(query, 1)[-1] if query in text else ""
        # "  1. 上  [###################.]  97.6%" (edge/serial_render.py)
        if re.search(r"1\.\s*" + re.escape(top) + r"\s+\[[#.]*\]\s*\d+(\.\d+)?%", after):
            open(sys.argv[4], "wb").write(buf)
            shown = re.sub(r"\s+", " ", after)[:120]
            print(f"answered in {time.time() - t0:.1f} s: {shown!r}")
            sys.exit(0)
open(sys.argv[4], "wb").write(buf)
tail = buf.decode("utf-8", "replace")[-200:]
print(f"no answer with {top!r} within 120 s; got {tail!r}")
sys.exit(1)
EOF
); verdict "serial unit answers a query over the pty" "$SERIAL_OUT"

HOSTNAME_NOW=$(guest hostname || true)
[ "$HOSTNAME_NOW" = imagecheck ]; verdict "settings: hostname" "hostname -> $HOSTNAME_NOW"
BIND=$(guest "ss -ltnH 'sport = :8000' | awk '{print \$4}'" || true)
[ "$BIND" = 0.0.0.0:8000 ]; verdict "settings: lan = on (service bound to 0.0.0.0)" "listening on $BIND"
REPORT=$(guest "cat /boot/firmware/fillmask-report.txt" || true)
printf '%s\n' "$REPORT" | sed "s/$TOKEN/<token>/" | sed 's/^/      /'
has "$REPORT" '^no errors$'; verdict "settings: fillmask-report.txt on the boot partition says no errors"

ROOT_NOW=$(guest "df -B1 --output=size / | tail -n 1" | tr -d ' ' || true)
[ "${ROOT_NOW:-0}" -gt $(( ROOT_PART_BYTES + 800 * 1048576 )) ]
verdict "first boot: root grown to the card" "root file system $(( ${ROOT_NOW:-0} / 1048576 )) MiB; root partition in the image $(( ROOT_PART_BYTES / 1048576 )) MiB, card 1024 MiB larger"
MACHINE_ID=$(guest "cat /etc/machine-id" || true)
NKEYS=$(guest "ls /etc/ssh/ssh_host_*_key | wc -l" || echo 0)
has "$MACHINE_ID" '^[0-9a-f]{32}$' && [ "$NKEYS" -ge 3 ]
verdict "first boot: machine-id and SSH host keys made" "machine-id $MACHINE_ID, $NKEYS SSH host keys"
# -- the kiosk (the -kiosk image): live on the virtio-gpu display ----------------------------
if [ "$VARIANT" = -kiosk ]; then
    lap
    step "the kiosk: cage + Chromium on the display (at most ${KIOSK_TIMEOUT}s from qemu's start)"
    # The service's own counters: this script never asks for "/" or /api/info, so
    # those are the kiosk's; /api/info answered 200 means the page's script sent the
    # token (api_token is set: the unit opens the page with it).
    page_seen() {
        curl -sS -m 30 "http://127.0.0.1:$HTTP_PORT/metrics" 2>>"$WORK/curl.log" \
            | grep -E '^fillmask_http_requests_total\{route="(/|/api/info)"' > "$WORK/kiosk-requests.txt"
        grep -qE 'route="/",method="GET",status="(200|304)"\} [1-9]' "$WORK/kiosk-requests.txt" \
            && grep -qE 'route="/api/info",method="GET",status="200"\} [1-9]' "$WORK/kiosk-requests.txt"
    }
    # A screenshot of the display through QMP (screendump, PPM), judged and kept as PNG:
    # the page's header (#4f46e5) across the top with white text on it, and its
    # background (#f4f5fb); a text console, a blank screen or Chromium's error page
    # has neither.
    screen_shows_page() {
        "$HOST_PYTHON" - "$WORK/qmp.sock" "$WORK/kiosk-screen" <<'PY'
import json, socket, struct, sys, zlib
sock_path, stem = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.settimeout(60)
s.connect(sock_path)
f = s.makefile("rwb")
def ask(command, **arguments):
    f.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n"); f.flush()
    while True:
        reply = json.loads(f.readline())
        if "return" in reply or "error" in reply:
            return reply
json.loads(f.readline())  # greeting
ask("qmp_capabilities")
reply = ask("screendump", filename=stem + ".ppm")
if "error" in reply:
    print(f"screendump: {reply['error']}"); sys.exit(1)
data = open(stem + ".ppm", "rb").read()
fields, pos = [], 0
while len(fields) < 4:  # P6 width height maxval
    while data[pos:pos + 1].isspace(): pos += 1
    end = pos
    while not data[end:end + 1].isspace(): end += 1
    fields.append(data[pos:end]); pos = end
pixels = data[pos + 1:]
w, h = int(fields[1]), int(fields[2])
rows = [pixels[y * w * 3:(y + 1) * w * 3] for y in range(h)]
png = b"".join(b"\0" + r for r in rows)
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
open(stem + ".png", "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                                + chunk(b"IDAT", zlib.compress(png, 6)) + chunk(b"IEND", b""))
near = lambda p, c, t: all(abs(a - b) <= t for a, b in zip(p, c))
def share(y0, y1, colour, t):
    n = hit = 0
    for r in rows[y0:y1]:
        for x in range(0, w, 2):
            n += 1; hit += near(r[3 * x:3 * x + 3], colour, t)
    return hit / max(n, 1)
band = 0  # the page's header: the rows from the top mostly in its colour
while band < h and share(band, band + 1, (0x4f, 0x46, 0xe5), 24) >= 0.4:
    band += 1
title = share(0, band, (255, 255, 255), 10) if band else 0.0  # its white title
background = share(band, h, (0xf4, 0xf5, 0xfb), 6)  # the page around its panels
panels = share(band, h, (0xff, 0xff, 0xff), 3)      # the white panels
colours = len({rows[y][3 * x:3 * x + 3] for y in range(0, h, 4) for x in range(0, w, 4)})
ok = (20 <= band <= h // 4 and 0.002 <= title < 0.5 and background >= 0.02
      and background + panels >= 0.5 and colours >= 16)
print(f"{w}x{h}: a {band}-row header band in the page's indigo with {title:.1%} white (its title); below it "
      f"{background:.0%} page background, {panels:.0%} white panels; {colours} colours sampled -> "
      f"{'the page' if ok else 'not the page'}")
sys.exit(0 if ok else 1)
PY
    }
    KIOSK_SHOWN=""; PAGE_FETCHED=""; SCREEN=""
    while :; do
        now=$(( $(date +%s) - ${BOOT_T0%.*} ))
        [ -n "$PAGE_FETCHED" ] || { page_seen && PAGE_FETCHED=$now; }
        if [ -n "$PAGE_FETCHED" ] && [ -S "$WORK/qmp.sock" ]; then
            SCREEN=$(screen_shows_page 2>&1) && { KIOSK_SHOWN=$now; break; }
        fi
        [ "$now" -lt "$KIOSK_TIMEOUT" ] || break
        kill -0 "$QEMU_PID" 2>/dev/null || break
        sleep 15
    done
    # Active and not restarting; one restart only as the unit's fallback: the first
    # start's compositor crashed on the GPU (qemu's virtio-gpu has no 3D) and the
    # next one draws with the CPU (the software-rendering mark).
    KIOSK_STATE=$(guest "systemctl show -p ActiveState -p SubState -p NRestarts fillmask-edge-kiosk.service; test -e /run/fillmask-kiosk/software-rendering && echo Renderer=pixman || echo Renderer=gles2" | tr '\n' ' ' || true)
    has "$KIOSK_STATE" 'ActiveState=active' && has "$KIOSK_STATE" 'SubState=running' \
        && { has "$KIOSK_STATE" 'NRestarts=0 ' || { has "$KIOSK_STATE" 'NRestarts=1 ' && has "$KIOSK_STATE" 'Renderer=pixman'; }; }
    verdict "kiosk unit active, not restarting (at most the one restart into software rendering)" "$KIOSK_STATE"
    # The kiosk user's processes (PAM's login session moves them out of the unit's
    # cgroup, into session-N.scope): with what command line.
    KIOSK_PROCS=$(guest 'for p in /proc/[0-9]*; do [ "$(stat -c %U $p 2>/dev/null)" = fillmask-kiosk ] && printf "%s %s\n" fillmask-kiosk "$(tr "\0" " " < $p/cmdline)"; done' || true)
    printf '%s\n' "$KIOSK_PROCS" | grep -E 'cage|chromium' | cut -c1-150 | head -n 4 | sed 's/^/      /'
    # (Each detail is computed before its test: a command substitution in verdict's
    # arguments would reset the status that verdict reads.)
    NCHROMIUM=$(printf '%s\n' "$KIOSK_PROCS" | grep -c chromium)
    has "$KIOSK_PROCS" '^fillmask-kiosk /usr/bin/cage ' && has "$KIOSK_PROCS" '^fillmask-kiosk [^ ]*chromium.* http://127\.0\.0\.1:8000/'
    verdict "kiosk: cage and Chromium running as fillmask-kiosk on http://127.0.0.1:8000/" \
        "$NCHROMIUM chromium processes of the kiosk user"
    REQUESTS=$(tr '\n' ' ' < "$WORK/kiosk-requests.txt" | sed 's/fillmask_http_requests_total//g')
    [ -n "$PAGE_FETCHED" ]
    verdict "kiosk: the page fetched and its script answered by the API with the token (the service's request counters)" \
        "${REQUESTS:-no GET / in /metrics}${PAGE_FETCHED:+ (seen $PAGE_FETCHED s after qemu started)}"
    [ -n "$KIOSK_SHOWN" ]
    verdict "kiosk: the page on the display (QMP screendump, $WORK/kiosk-screen.png)" \
        "${SCREEN:-no screenshot taken}${KIOSK_SHOWN:+; on screen $KIOSK_SHOWN s after qemu started}"
    FONTS=$(guest 'fc-list :lang=zh family 2>/dev/null | head -n 1; echo "|"; fc-list :charset=1f52e family 2>/dev/null | head -n 1' | tr -d '\n' || true)
    has "$FONTS" '^[^|]+\|[^|]+$'
    verdict "kiosk: fontconfig has a Chinese font and an emoji font (fc-list :lang=zh, :charset=1f52e)" "$FONTS"
    # cage's and Chromium's own lines are the kiosk user's (their session scope), the
    # unit's are systemd's.
    guest 'journalctl -b --no-pager -q -o cat -u fillmask-edge-kiosk.service | tail -n 6; journalctl -b --no-pager -q -o cat _UID=$(id -u fillmask-kiosk) | grep -v -e "^pam_" -e "^Reached target" | tail -n 8' \
        | cut -c1-160 | sed 's/^/      kiosk journal: /' || true
fi

FAILED_UNITS=$(guest "systemctl --failed --no-legend --plain" || true)
[ -z "$FAILED_UNITS" ]; verdict "no failed units" "${FAILED_UNITS:-none}"
OUR_UNITS="-u fillmask-edge.service -u 'fillmask-edge-serial@*' -u fillmask-board-settings.service -u fillmask-firstboot.service"
[ "$VARIANT" = -kiosk ] && OUR_UNITS="$OUR_UNITS -u fillmask-edge-kiosk.service"
ERRORS=$(guest "journalctl -b --no-pager -q -p err $OUR_UNITS" || true)
[ -z "$ERRORS" ]; verdict "no error lines from our units in the journal" "${ERRORS:-none} (journalctl -b -p err, fillmask-* units)"
guest "journalctl -b --no-pager -q -o cat -u fillmask-firstboot.service -u fillmask-board-settings.service" | sed "s/$TOKEN/<token>/" | sed 's/^/      /' || true
lap

# -- a bad value, then a reboot ------------------------------------------------------------------
step "a bad value in fillmask.txt (lan = perhaps) and a new hostname, then reboot"
guest "sed -i -e 's/^lan = .*/lan = perhaps/' -e 's/^hostname = .*/hostname = imagecheck2/' /boot/firmware/fillmask.txt && sync" \
    || fail "editing fillmask.txt on the board"
BOOT_ID=$(guest "cat /proc/sys/kernel/random/boot_id" || true)
guest "systemctl reboot" || true
REBOOT_T0=$(date +%s.%N)
# Until the old system stops answering (the service stops early in the shutdown).
for _ in $(seq 100); do [ "$(predict "$TOKEN")" = 200 ] || break; sleep 3; done
if wait_answer "$REBOOT_T0" "$BOOT_TIMEOUT"; then
    REBOOT_ANSWER=$ANSWER_S
    pass "reboot comes back serving" "$(printf '%.0f' "$REBOOT_ANSWER") s from 'systemctl reboot' to the first answer"
else
    fail "reboot comes back serving" "no answer within ${BOOT_TIMEOUT}s"
fi
NEW_BOOT_ID=$(guest "cat /proc/sys/kernel/random/boot_id" || true)
[ -n "$NEW_BOOT_ID" ] && [ "$NEW_BOOT_ID" != "$BOOT_ID" ]; verdict "it really rebooted" "boot id $BOOT_ID -> $NEW_BOOT_ID"
BAD=$(guest "journalctl -b --no-pager -q -p err -o cat -u fillmask-board-settings.service" || true)
has "$BAD" 'lan'; verdict "bad value reported in the journal (priority err)" "$BAD"
HOSTNAME_NOW=$(guest hostname || true)
BIND=$(guest "ss -ltnH 'sport = :8000' | awk '{print \$4}'" || true)
[ "$HOSTNAME_NOW" = imagecheck2 ] && [ "$BIND" = 0.0.0.0:8000 ]
verdict "the other settings still applied, the bad one left as it was" "hostname $HOSTNAME_NOW, service on $BIND"
ERRORS=$(guest "journalctl -b --no-pager -q -p err $OUR_UNITS" | grep -v 'fillmask.txt: line [0-9]*: lan:' || true)
[ -z "$ERRORS" ]; verdict "no other error lines from our units after the reboot" "${ERRORS:-none}"
if [ "$VARIANT" = -kiosk ]; then
    KIOSK_ACTIVE=$(guest "systemctl is-active fillmask-edge-kiosk.service" || true)
    [ "$KIOSK_ACTIVE" = active ]; verdict "kiosk active again after the reboot" "$KIOSK_ACTIVE"
fi
FIRSTBOOT=$(guest "systemctl show -p ConditionResult --value fillmask-firstboot.service" || true)
[ "$FIRSTBOOT" = no ]; verdict "first-boot unit skipped on the second boot" "ConditionResult=$FIRSTBOOT"
lap

guest "systemctl poweroff" || true
for _ in $(seq 60); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 2; done

step "summary ($(( $(date +%s) - START ))s in all)"
echo "    image: $(basename "$IMAGE") ($(( $(stat -c %s "$IMAGE") / 1048576 )) MiB xz, $(( IMAGE_BYTES / 1048576 )) MiB raw)"
echo "    boot to first answer: $(printf '%.0f' "${FIRST_ANSWER:-0}") s; reboot to first answer: $(printf '%.0f' "${REBOOT_ANSWER:-0}") s (qemu TCG, cortex-a72 x$SMP, this machine)"
echo "    passed ${#PASSED[@]}, failed ${#FAILED[@]}"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf '    FAILED: %s\n' "${FAILED[@]}"
    echo "    guest console: $WORK/console.log"
    exit 1
fi
echo "    image check passed"
