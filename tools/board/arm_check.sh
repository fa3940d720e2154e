#!/usr/bin/env bash
# Proof that the artifact runs on ARM: install it into an arm64 Debian root under
# qemu user-mode emulation, run the runtime's tests and predictions there, and
# compare the answers with this (x86) machine's.
#
#   sudo tools/board/arm_check.sh [--archive dist/fillmask-edge-*.tar.gz] [--root DIR]
#                           [--suite bookworm] [--cpus "cortex-a72 cortex-a76"] [--tolerance 0.02]
#
# Steps (each timed): apt-get install debootstrap qemu-user-static binfmt-support if
# missing; mount binfmt_misc and enable qemu-aarch64; debootstrap --arch=arm64
# minbase + python3 into DIR (default /var/tmp/fillmask-arm64-SUITE, kept and
# reused); build the archive with tools/board/make_dist.sh unless --archive is given;
# run install.sh inside the root (offline, from the archive's wheels; no systemd
# there, so it checks with one prediction); run the tests that need no torch
# against the installed package with QEMU_CPU=first of --cpus (cortex-a72 = Pi 4);
# predict a fixed query set with each CPU model (cortex-a76 = Pi 5, with sdot) and
# compare with x86: same top-5 candidates (a swap allowed only between candidates
# whose scores are within the tolerance) and every score within the tolerance;
# (qemu 7.2 shows the host's x86 /proc/cpuinfo, on which onnxruntime crashes, so a
# Raspberry Pi-like one for the emulated core is bound over the chroot's);
# then uninstall.sh and check that it left nothing behind. Runs niced: the build
# machine stays usable. Exit status 0 only if every check passed.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ARM_ROOT=""
ARCHIVE=""
CPUS="cortex-a72 cortex-a76"
TOLERANCE=0.02
HOST_PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$HOST_PYTHON" ] || HOST_PYTHON=python3

die() { echo "arm_check: error: $*" >&2; exit 2; }
# shellcheck source=chroot_lib.sh
. "$REPO/tools/board/chroot_lib.sh"
while [ $# -gt 0 ]; do
    case "$1" in
        --archive) ARCHIVE=$(realpath "$2"); shift 2 ;;
        --root) ARM_ROOT=$2; shift 2 ;;
        --suite) SUITE=$2; shift 2 ;;
        --cpus) CPUS=$2; shift 2 ;;
        --tolerance) TOLERANCE=$2; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
ARM_ROOT=${ARM_ROOT:-/var/tmp/fillmask-arm64-$SUITE}
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, binfmt_misc)"

START=$(date +%s)
LAST=$START
FAILED=()
step() { echo; echo "==> [$(( $(date +%s) - START ))s] $*"; }
lap() { local now; now=$(date +%s); echo "    ($(( now - LAST ))s)"; LAST=$now; }
NICE=(nice -n 19)

# -- 1. tools and binfmt -----------------------------------------------------------
step "host tools"
need_tools debootstrap:debootstrap qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support
enable_qemu_binfmt
lap

# -- 2. the arm64 root ---------------------------------------------------------------
if [ ! -f "$ARM_ROOT/.fillmask-debootstrap-done" ]; then
    step "debootstrap $SUITE arm64 (minbase + python3) into $ARM_ROOT"
    rm -rf "$ARM_ROOT"
    "${NICE[@]}" debootstrap --arch=arm64 --variant=minbase --include=python3 "$SUITE" "$ARM_ROOT" "$MIRROR" \
        > "$ARM_ROOT.debootstrap.log" 2>&1 || { tail -20 "$ARM_ROOT.debootstrap.log"; die "debootstrap failed (log: $ARM_ROOT.debootstrap.log)"; }
    touch "$ARM_ROOT/.fillmask-debootstrap-done"
    lap
else
    step "reusing the arm64 root $ARM_ROOT"
fi
echo "    $(chroot "$ARM_ROOT" uname -m), $(chroot "$ARM_ROOT" python3 --version), $(chroot "$ARM_ROOT" sh -c '. /etc/os-release; echo $PRETTY_NAME')"

cleanup() {
    umount "$ARM_ROOT/proc/cpuinfo" 2>/dev/null || true
    umount_all
}
trap cleanup EXIT
mount_api "$ARM_ROOT"
# qemu 7.2 (Bookworm) shows ARM programs the host's x86 /proc/cpuinfo, and
# ONNX Runtime's CPU detection (pytorch/cpuinfo) crashes on it at import. A board
# has an ARM one: bind a Raspberry Pi-like /proc/cpuinfo matching the emulated core
# over the chroot's (its own proc mount; the host's is untouched).
use_cpu() {
    local cpu=$1 part variant revision features model file
    case $cpu in
        cortex-a72) part=0xd08 variant=0x0 revision=3 model="Raspberry Pi 4 Model B (emulated)"
                    features="fp asimd evtstrm crc32 cpuid" ;;
        cortex-a76) part=0xd0b variant=0x4 revision=1 model="Raspberry Pi 5 Model B (emulated)"
                    features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
        *) die "no /proc/cpuinfo template for QEMU_CPU=$cpu (use cortex-a72 or cortex-a76)" ;;
    esac
    file=$ARM_ROOT/tmp/fillmask-cpuinfo-$cpu
    : > "$file"
    for (( i=0; i<$(nproc --all); i++ )); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
            "$i" "$features" "$variant" "$part" "$revision" >> "$file"
    done
    printf 'Model\t\t: %s\n' "$model" >> "$file"
    umount "$ARM_ROOT/proc/cpuinfo" 2>/dev/null || true
    mount --bind "$file" "$ARM_ROOT/proc/cpuinfo"
    export QEMU_CPU=$cpu
}
in_root() { "${NICE[@]}" chroot "$ARM_ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU="${QEMU_CPU:-max}" "$@"; }

# -- 3. the archive ------------------------------------------------------------------
if [ -z "$ARCHIVE" ]; then
    step "building the archive (tools/board/make_dist.sh)"
    extra=()
    [ -f "$REPO/edge/default_bundle/manifest.json" ] || extra=(--bundle "$REPO/tests/fixtures/tiny_bundle")
    OUTDIR=$REPO/dist  # git-ignored; what `make dist` produces too
    "${NICE[@]}" "$REPO/tools/board/make_dist.sh" --out "$OUTDIR" "${extra[@]}" | grep -v '^    ' || die "make_dist.sh failed"
    ARCHIVE=$(ls -t "$OUTDIR"/fillmask-edge-*-linux-aarch64.tar.gz | head -n 1)
    lap
fi
[ -f "$ARCHIVE" ] || die "no archive at $ARCHIVE"
echo "    archive: $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1))"

# -- 4. install inside the root ------------------------------------------------------
snapshot() { (cd "$ARM_ROOT" && find opt etc var/lib usr/local -xdev 2>/dev/null | LC_ALL=C sort); }
rm -rf "$ARM_ROOT/tmp/fillmask" && mkdir -p "$ARM_ROOT/tmp/fillmask"
tar -C "$ARM_ROOT/tmp/fillmask" -xzf "$ARCHIVE"
DIST=$(basename "$ARCHIVE" .tar.gz)
rm -rf "$ARM_ROOT/opt/fillmask-check"
if [ -e "$ARM_ROOT/opt/fillmask-edge" ] || [ -e "$ARM_ROOT/etc/default/fillmask-edge" ]; then
    step "removing what an interrupted earlier run installed"
    in_root sh "/tmp/fillmask/$DIST/uninstall.sh"
fi
snapshot > "$ARM_ROOT/tmp/fillmask/before.txt"
step "install.sh inside the arm64 root (offline, QEMU_CPU=${CPUS%% *})"
use_cpu "${CPUS%% *}"
if ! in_root sh "/tmp/fillmask/$DIST/install.sh"; then FAILED+=("install.sh"); fi
lap

# Which bundle the installed service serves, and the same files on this machine.
BUNDLE_IN_ROOT=$(sed -n 's/^FILLMASK_BUNDLE=//p' "$ARM_ROOT/etc/default/fillmask-edge" 2>/dev/null | tail -n 1)
if [ -n "$BUNDLE_IN_ROOT" ]; then HOST_BUNDLE=$ARM_ROOT$BUNDLE_IN_ROOT; else HOST_BUNDLE=$REPO/edge/default_bundle; fi
VENV=/opt/fillmask-edge/venv/bin/python

# -- 5. the runtime's tests on arm64 ------------------------------------------------------
step "runtime tests on arm64 (QEMU_CPU=$QEMU_CPU)"
CHECK=/opt/fillmask-check
rm -rf "$ARM_ROOT$CHECK" && mkdir -p "$ARM_ROOT$CHECK"
cp -r "$REPO/tests" "$REPO/systemd" "$ARM_ROOT$CHECK/"
mkdir -p "$ARM_ROOT$CHECK/tools/board" && cp "$REPO"/tools/board/*.sh "$ARM_ROOT$CHECK/tools/board/"  # the scripts only, no toolchain
# The SD image's boot-settings script runs on the board with the system python3 (stdlib
# only), so its tests run here too.
cp -r "$REPO/tools/board/image" "$ARM_ROOT$CHECK/tools/board/"
find "$ARM_ROOT$CHECK" -name __pycache__ -prune -exec rm -rf {} +
# Tests that need the workstation toolchain (torch, transformers, tools/) stay on x86.
TESTS=$(cd "$REPO" && grep -L -E '^\s*(from|import) (tools|torch|transformers)\b|selenium' tests/test_*.py | tr '\n' ' ')
echo "    tests: $TESTS"
"$HOST_PYTHON" -m pip download -q --only-binary=:all: --python-version 3.11 --platform manylinux2014_aarch64 \
    -d "$ARM_ROOT/tmp/fillmask/testwheels" pytest 2>&1 | grep -v '^WARNING: Location' || true
in_root "$VENV" "/tmp/fillmask/$DIST/wheels/$(basename "$(ls "$ARM_ROOT/tmp/fillmask/$DIST"/wheels/pip-*.whl)")/pip" \
    install -q --isolated --no-index --find-links /tmp/fillmask/testwheels pytest
if in_root sh -c "cd $CHECK && $VENV -m pytest -q -p no:cacheprovider $TESTS" > "$ARM_ROOT/tmp/fillmask/pytest.log" 2>&1; then
    PYTEST_RESULT="passed: $(tail -n 1 "$ARM_ROOT/tmp/fillmask/pytest.log")"
else
    PYTEST_RESULT="FAILED: $(tail -n 1 "$ARM_ROOT/tmp/fillmask/pytest.log")"
    FAILED+=("pytest")
    grep -E '^(FAILED|ERROR|E  )' "$ARM_ROOT/tmp/fillmask/pytest.log" | head -30 | sed 's/^/    /'
    echo "    full log: $ARM_ROOT/tmp/fillmask/pytest.log"
fi
echo "    $PYTEST_RESULT"
lap

# -- 6. same answers as x86 -------------------------------------------------------------
cat > "$ARM_ROOT/tmp/fillmask/predict.py" <<'EOF'
"""Predict a fixed query set; print JSON with the model's sha256 and the answers."""
import json, platform, sys
from edge.engine import Engine
from edge.manifest import sha256_of
QUERIES = [
    ("床前明月光，疑是地[MASK]霜。", None),
    ("今天天气很[MASK][MASK]，我们去公园散步吧。", None),
    ("他做事一向[MASK][MASK][MASK][MASK]，从不马虎。", None),
    ("[MASK]国的首都是北京。", None),
    ("春眠不觉[MASK]，处处闻啼[MASK]。", None),
    ("我想喝一杯[MASK]。", "auto"),
    ("这家餐厅的菜很好吃，服务也很周到，价格也不贵，我们一家人周末常常来这里吃饭，"
     "孩子们最喜欢这里的红烧肉和[MASK][MASK]，每次都要点两份。老板说他们已经开了二十多年了。", None),
]
bundle = sys.argv[1] or None
engine = Engine.from_bundle(bundle, threads=1, cache_size=0)
answers = [engine.predict(text, top_k=10, blank_length=length)["blanks"] for text, length in QUERIES]
model = engine.bundle.model_path if hasattr(engine, "bundle") else None
print(json.dumps({"machine": platform.machine(), "model": engine.info().get("name"),
                  "sha256": sha256_of(model) if model else None, "answers": answers}, ensure_ascii=False))
engine.close()
EOF
step "predictions: x86 (this machine) and arm64 (${CPUS})"
PYTHONPATH=$REPO "${NICE[@]}" "$HOST_PYTHON" "$ARM_ROOT/tmp/fillmask/predict.py" "${BUNDLE_IN_ROOT:+$HOST_BUNDLE}" \
    > "$ARM_ROOT/tmp/fillmask/x86.json"
for cpu in $CPUS; do
    use_cpu "$cpu"
    in_root "$VENV" /tmp/fillmask/predict.py "$BUNDLE_IN_ROOT" > "$ARM_ROOT/tmp/fillmask/arm-$cpu.json" \
        || FAILED+=("predict on $cpu")
done
COMPARE=$("$HOST_PYTHON" - "$TOLERANCE" "$ARM_ROOT/tmp/fillmask/x86.json" "$ARM_ROOT"/tmp/fillmask/arm-*.json <<'EOF'
import json, sys
tol = float(sys.argv[1])
ref = json.load(open(sys.argv[2]))
ok = True
for path in sys.argv[3:]:
    other = json.load(open(path))
    problems, max_diff, max_rel, same_order, blanks = [], 0.0, 0.0, 0, 0
    if other["sha256"] != ref["sha256"]:
        problems.append(f"different model files ({other['sha256']} vs {ref['sha256']})")
    for q, (a_blanks, b_blanks) in enumerate(zip(ref["answers"], other["answers"])):
        for a, b in zip(a_blanks, b_blanks):
            blanks += 1
            sa = {c["text"]: c["score"] for c in a["candidates"]}
            sb = {c["text"]: c["score"] for c in b["candidates"]}
            for text in sa.keys() & sb.keys():
                max_diff = max(max_diff, abs(sa[text] - sb[text]))
                max_rel = max(max_rel, abs(sa[text] - sb[text]) / max(sa[text], 1e-12))
            top_a = [c["text"] for c in a["candidates"][:5]]
            top_b = [c["text"] for c in b["candidates"][:5]]
            if top_a == top_b:
                same_order += 1
                continue
            # A difference is acceptable only between near-tied candidates.
            for rank, (ta, tb) in enumerate(zip(top_a, top_b)):
                if ta != tb and abs(sa.get(ta, 0.0) - sb.get(ta, 0.0)) > tol:
                    problems.append(f"query {q}: rank {rank + 1} {ta!r} (x86) vs {tb!r}")
            kth = a["candidates"][4]["score"] if len(a["candidates"]) > 4 else 0.0
            for ta in set(top_a) - set(top_b):
                if abs(sa[ta] - kth) > tol:
                    problems.append(f"query {q}: {ta!r} in x86 top-5 only, score {sa[ta]:.4f}")
    if max_diff > tol:
        problems.append(f"score difference {max_diff:.2e} > {tol}")
    verdict = "same answers" if not problems else "DIFFERENT: " + "; ".join(problems)
    print(f"{path.rsplit('/', 1)[-1]}: {verdict} (top-5 identical in order for {same_order}/{blanks} blanks, "
          f"max |score diff| {max_diff:.2e} (relative {max_rel:.2e}), tolerance {tol})")
    ok = ok and not problems
sys.exit(0 if ok else 1)
EOF
) || FAILED+=("x86/arm comparison")
echo "$COMPARE" | sed 's/^/    /'
lap

# -- 7. uninstall leaves nothing behind ---------------------------------------------------------
step "uninstall.sh inside the arm64 root"
rm -rf "$ARM_ROOT$CHECK"
in_root sh /opt/fillmask-edge/uninstall.sh || FAILED+=("uninstall.sh")
snapshot > "$ARM_ROOT/tmp/fillmask/after.txt"
LEFT=$(diff "$ARM_ROOT/tmp/fillmask/before.txt" "$ARM_ROOT/tmp/fillmask/after.txt" || true)
if [ -n "$LEFT" ]; then
    echo "$LEFT" | head -20
    FAILED+=("uninstall left files behind")
else
    echo "    nothing left behind in /opt, /etc, /var/lib, /usr/local"
fi
lap

step "summary ($(( $(date +%s) - START ))s in all)"
echo "    archive: $(basename "$ARCHIVE"); root: $ARM_ROOT ($SUITE arm64); tests: $PYTEST_RESULT"
echo "$COMPARE" | sed 's/^/    /'
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "    FAILED: ${FAILED[*]}"
    exit 1
fi
echo "    arm check passed"
