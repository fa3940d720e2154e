#!/usr/bin/env bash
# A flashable Raspberry Pi SD-card image: Debian bookworm arm64 with fillmask-edge
# installed offline from the dist archive.
#
#   sudo tools/board/make_image.sh [--archive dist/fillmask-edge-*-linux-aarch64.tar.gz]
#                                  [--kiosk] [--out dist] [--rootfs-only] [--no-xz]
#
# Boards: those that Debian's own kernel (linux-image-arm64) and raspi-firmware boot:
# Raspberry Pi 3 A+/B/B+, CM3, 4 B, 400, CM4 and Zero 2 W (64-bit; their device trees
# are on the boot partition; no Wi-Fi firmware for the Zero 2 W's brcmfmac43436 in
# bookworm's firmware-brcm80211). Not the Pi 5 (no Pi 5
# boot firmware or device tree in bookworm's raspi-firmware/kernel 6.1: use the
# installer archive on Raspberry Pi OS there), nor the 32-bit-only Pi 1/2/Zero.
#
# Steps (each timed), every package from Debian's archive, nothing from elsewhere:
#  1. host tools (debootstrap, qemu-user-static, fdisk, dosfstools, mtools, bmap-tools);
#  2. the cached root: debootstrap minbase + the packages of tools/board/image/
#     packages.txt (+ packages-kiosk.txt with --kiosk) under qemu user-mode, kept in
#     /var/tmp/fillmask-image-rootfs-bookworm[-kiosk] with a done-marker holding the
#     sha256 of the package lists and of this stage: a second run skips it;
#  3. a copy of that root, into which install.sh --no-start installs the archive
#     offline (as on a board) and the image's own files go: fstab, network, the
#     boot-partition settings (fillmask.txt) and their first-boot/every-boot units;
#     machine-id emptied and SSH host keys removed (made fresh on first boot);
#  4. the card: MBR, FAT32 "RASPIFIRM" (/boot/firmware: Pi firmware, kernel,
#     initrd, config.txt, cmdline.txt, fillmask.txt) + ext4 "RASPIROOT" (grown to
#     the card on first boot); ext4 through a loop device, FAT with mtools;
#  5. dist/fillmask-edge-VERSION-rpi-arm64[-kiosk].img.xz, .sha256 and .bmap.
# Runs niced; needs root and loop devices, no KVM. Exit status 0 only on success.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$REPO/tools/board/image
SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
ARCHIVE=""
KIOSK=no
OUTDIR=$REPO/dist
ROOTFS_ONLY=no
XZ=yes
HOST_PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$HOST_PYTHON" ] || HOST_PYTHON=python3

die() { echo "make_image: error: $*" >&2; exit 2; }
# shellcheck source=chroot_lib.sh
. "$REPO/tools/board/chroot_lib.sh"
while [ $# -gt 0 ]; do
    case "$1" in
        --archive) [ $# -ge 2 ] || die "--archive needs a file"; ARCHIVE=$(realpath "$2"); shift 2 ;;
        --kiosk) KIOSK=yes; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a folder"; OUTDIR=$2; shift 2 ;;
        --rootfs-only) ROOTFS_ONLY=yes; shift ;;
        --no-xz) XZ=no; shift ;;
        -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, loop devices)"

VARIANT=""
[ "$KIOSK" = yes ] && VARIANT=-kiosk
WORK=/var/tmp/fillmask-image-work$VARIANT

START=$(date +%s)
LAST=$START
step() { echo; echo "==> [$(( $(date +%s) - START ))s] $*"; }
lap() { local now; now=$(date +%s); echo "    ($(( now - LAST ))s)"; LAST=$now; }
NICE=(nice -n 19)

packages() { sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$@" | tr -s ' \t' '\n' | sed '/^$/d'; }

# -- 1. host tools ---------------------------------------------------------------------
step "host tools"
need_tools debootstrap:debootstrap qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support \
    mkfs.vfat:dosfstools mcopy:mtools sfdisk:fdisk mkfs.ext4:e2fsprogs bmaptool:bmap-tools xz:xz-utils
enable_qemu_binfmt
lap

# Mounts inside a root (MOUNTS, mount_api: chroot_lib.sh) and loop devices, undone on exit.
LOOPS=()
cleanup() {
    umount_all
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || true; done
    LOOPS=()
}
trap cleanup EXIT
in_root() {  # in_root ROOT CMD...
    local root=$1; shift
    "${NICE[@]}" chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive QEMU_CPU=cortex-a72 "$@"
}

# -- 2. the cached root ------------------------------------------------------------------
# Two caches: the base root (debootstrap + packages.txt) and, for --kiosk, a copy of it
# with packages-kiosk.txt added (so the kiosk image does not debootstrap again). The
# key of each: the suite, its package list(s) and this stage's own code (between the
# markers).
STAGE_CODE=$(sed -n '/^# >>> rootfs stage/,/^# <<< rootfs stage/p' "$0")
BASE_CACHE=/var/tmp/fillmask-image-rootfs-$SUITE
BASE_PACKAGES=$(packages "$HERE/packages.txt" | tr '\n' ' ')
KIOSK_PACKAGES=$(packages "$HERE/packages-kiosk.txt" | tr '\n' ' ')
key_of() { printf '%s\n%s\n%s\n' "$SUITE" "$1" "$STAGE_CODE" | sha256sum | cut -d' ' -f1; }
# >>> rootfs stage
cache_ok() { [ "$(cat "$1/.fillmask-image-rootfs-done" 2>/dev/null)" = "$2" ]; }
fresh_dir() {  # unmount anything left under $1 (an interrupted run), then empty it
    local m
    for m in $(grep -o " $1/[^ ]*" /proc/mounts | sort -r); do umount -l "$m" || true; done
    rm -rf "$1"
}
apt_install() {  # apt_install ROOT PACKAGES...: from Debian's archive, no recommends
    local root=$1; shift
    mount_api "$root"
    # The host's DNS while apt runs: systemd-resolved made resolv.conf a link to
    # /run/systemd/resolve/stub-resolv.conf, which a chroot lacks (the kiosk root is
    # a copy of the base root); the link is put back afterwards.
    local resolv=""
    if [ -L "$root/etc/resolv.conf" ] || [ ! -e "$root/etc/resolv.conf" ]; then
        resolv=$(readlink "$root/etc/resolv.conf" || true)
        rm -f "$root/etc/resolv.conf"
        cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    fi
    in_root "$root" apt-get update -q >> "$root.apt.log" 2>&1 \
        || { tail -20 "$root.apt.log"; die "apt-get update failed inside $root (log: $root.apt.log)"; }
    # INITRD=No: the kernel package's hook makes no initramfs while the packages go in
    # (initramfs-tools' trigger then has none to update); the base stage makes it
    # once, after everything is installed (update-initramfs -c below).
    in_root "$root" INITRD=No apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" >> "$root.apt.log" 2>&1 \
        || { tail -30 "$root.apt.log"; die "apt-get install failed inside $root (log: $root.apt.log)"; }
    in_root "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/*_Packages "$root"/var/lib/apt/lists/*_Translation-*
    [ -n "$resolv" ] && ln -sf "$resolv" "$root/etc/resolv.conf"
    cleanup
}
BASE_KEY=$(key_of "$BASE_PACKAGES")
if ! cache_ok "$BASE_CACHE" "$BASE_KEY"; then
    step "debootstrap $SUITE arm64 minbase into $BASE_CACHE (cached afterwards)"
    fresh_dir "$BASE_CACHE"
    mkdir -p "$BASE_CACHE"
    : > "$BASE_CACHE.apt.log"
    "${NICE[@]}" debootstrap --arch=arm64 --variant=minbase --components=main,non-free-firmware \
        "$SUITE" "$BASE_CACHE" "$MIRROR" > "$BASE_CACHE.debootstrap.log" 2>&1 \
        || { tail -20 "$BASE_CACHE.debootstrap.log"; die "debootstrap failed (log: $BASE_CACHE.debootstrap.log)"; }
    lap
    step "apt-get install the image's packages ($(echo "$BASE_PACKAGES" | wc -w) named, from packages.txt)"
    cat > "$BASE_CACHE/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main non-free-firmware
deb $MIRROR $SUITE-updates main non-free-firmware
deb $SECURITY_MIRROR $SUITE-security main non-free-firmware
EOF
    # No daemons start inside the chroot; dpkg skips fsync while building (removed
    # below: a board's own apt upgrades stay safe against power loss).
    printf '#!/bin/sh\nexit 101\n' > "$BASE_CACHE/usr/sbin/policy-rc.d"
    chmod 0755 "$BASE_CACHE/usr/sbin/policy-rc.d"
    echo force-unsafe-io > "$BASE_CACHE/etc/dpkg/dpkg.cfg.d/00-fillmask-image-build"
    # No manuals, documentation or translations on the card (smaller, faster to
    # build): the copyright files stay. Kept on the board for its own apt upgrades.
    cat > "$BASE_CACHE/etc/dpkg/dpkg.cfg.d/01-fillmask-image-nodoc" <<'EOF'
# fillmask-edge image: no manuals, documentation or translations (copyrights kept).
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF
    find "$BASE_CACHE/usr/share/doc" -type f ! -name copyright -delete 2>/dev/null || true
    rm -rf "$BASE_CACHE"/usr/share/man/* "$BASE_CACHE"/usr/share/info/* "$BASE_CACHE"/usr/share/locale/*/
    # The Pi's root and consoles for raspi-firmware's cmdline.txt (written by its
    # kernel hook): the GPIO header UART is ttyS1 (mini UART) on the Pi 3/4/Zero 2 W
    # under Debian's kernel, ttyAMA0 being the Bluetooth UART.
    mkdir -p "$BASE_CACHE/etc/default"
    cat > "$BASE_CACHE/etc/default/raspi-firmware" <<'EOF'
# Read by raspi-firmware's kernel hook, which writes /boot/firmware/cmdline.txt.
ROOTPART=LABEL=RASPIROOT
CONSOLES="ttyS1,115200 tty0"
KERNEL_ARCH="arm64"
EOF
    # virtio drivers in the initramfs, so that the same image boots under qemu's virt
    # machine (make image-check): disk, and the console that check logs.
    mkdir -p "$BASE_CACHE/etc/initramfs-tools"
    printf '%s\n' '# virtio: the same image boots under qemu (make image-check)' \
        virtio_mmio virtio_blk virtio_pci virtio_console >> "$BASE_CACHE/etc/initramfs-tools/modules"
    # shellcheck disable=SC2086
    apt_install "$BASE_CACHE" $BASE_PACKAGES
    lap
    # One initramfs per kernel, made once all packages (and their initramfs hooks) are
    # in: before, the kernel's hook made one and initramfs-tools' trigger made it
    # again (~15 min each under qemu user-mode). Its post-update hook is
    # raspi-firmware's, which fills /boot/firmware (kernel, initrd, dtbs, config.txt,
    # cmdline.txt).
    step "update-initramfs -c -k all (once, after the packages)"
    mount_api "$BASE_CACHE"
    in_root "$BASE_CACHE" update-initramfs -c -k all >> "$BASE_CACHE.apt.log" 2>&1 \
        || { tail -20 "$BASE_CACHE.apt.log"; die "update-initramfs failed inside $BASE_CACHE (log: $BASE_CACHE.apt.log)"; }
    cleanup
    echo "    initramfs generations in the log: $(grep -c 'update-initramfs: Generating' "$BASE_CACHE.apt.log")"
    for k in "$BASE_CACHE"/boot/vmlinuz-*; do
        k=${k##*/vmlinuz-}
        [ -f "$BASE_CACHE/boot/firmware/initrd.img-$k" ] && [ -f "$BASE_CACHE/boot/firmware/vmlinuz-$k" ] \
            || die "no initrd.img-$k / vmlinuz-$k in $BASE_CACHE/boot/firmware after update-initramfs"
    done
    rm -f "$BASE_CACHE/etc/dpkg/dpkg.cfg.d/00-fillmask-image-build"
    echo "$BASE_KEY" > "$BASE_CACHE/.fillmask-image-rootfs-done"
    echo "    $(du -sh "$BASE_CACHE" | cut -f1) in $BASE_CACHE"
    lap
else
    step "reusing the cached root $BASE_CACHE (packages.txt unchanged)"
fi
CACHE=$BASE_CACHE
if [ "$KIOSK" = yes ]; then
    CACHE=$BASE_CACHE-kiosk
    KIOSK_KEY=$(key_of "$BASE_PACKAGES | $KIOSK_PACKAGES")
    if ! cache_ok "$CACHE" "$KIOSK_KEY"; then
        step "the kiosk root: $BASE_CACHE + $(echo "$KIOSK_PACKAGES" | wc -w) packages from packages-kiosk.txt into $CACHE (cached afterwards)"
        fresh_dir "$CACHE"
        cp -a "$BASE_CACHE" "$CACHE"
        rm -f "$CACHE/.fillmask-image-rootfs-done"
        : > "$CACHE.apt.log"
        echo force-unsafe-io > "$CACHE/etc/dpkg/dpkg.cfg.d/00-fillmask-image-build"
        # shellcheck disable=SC2086
        apt_install "$CACHE" $KIOSK_PACKAGES
        rm -f "$CACHE/etc/dpkg/dpkg.cfg.d/00-fillmask-image-build"
        echo "$KIOSK_KEY" > "$CACHE/.fillmask-image-rootfs-done"
        echo "    $(du -sh "$CACHE" | cut -f1) in $CACHE"
        lap
    else
        step "reusing the cached kiosk root $CACHE (package lists unchanged)"
    fi
fi
# <<< rootfs stage
echo "    $(chroot "$CACHE" sh -c '. /etc/os-release; echo $PRETTY_NAME'), kernel $(ls "$CACHE"/boot/vmlinuz-* | sed 's|.*/vmlinuz-||')"
[ "$ROOTFS_ONLY" = yes ] && { step "done (--rootfs-only)"; exit 0; }

# -- 3. the image's root: a copy of the cache, the archive installed offline ------------
if [ -z "$ARCHIVE" ]; then
    ARCHIVE=$(ls -t "$REPO"/dist/fillmask-edge-*-linux-aarch64.tar.gz 2>/dev/null | head -n 1 || true)
    [ -n "$ARCHIVE" ] || die "no dist/fillmask-edge-*-linux-aarch64.tar.gz: run make dist first (make image does)"
fi
[ -f "$ARCHIVE" ] || die "no archive at $ARCHIVE"
DIST=$(basename "$ARCHIVE" .tar.gz)
VERSION=$(echo "$DIST" | sed -n 's/^fillmask-edge-\(.*\)-linux-aarch64$/\1/p')
[ -n "$VERSION" ] || die "cannot read the version from $ARCHIVE (expected fillmask-edge-VERSION-linux-aarch64.tar.gz)"
NAME=fillmask-edge-$VERSION-rpi-arm64$VARIANT

step "copying the cached root to $WORK/root"
for m in $(grep -o " $WORK/[^ ]*" /proc/mounts | sort -r); do umount -l "$m" || true; done
rm -rf "$WORK"
mkdir -p "$WORK"
ROOT=$WORK/root
cp -a "$CACHE" "$ROOT"
rm -f "$ROOT/.fillmask-image-rootfs-done"
lap

step "install.sh --no-start$( [ "$KIOSK" = yes ] && echo " --kiosk") inside the root (offline, from $(basename "$ARCHIVE"))"
mount_api "$ROOT"
# qemu 7.2 user-mode shows ARM programs the host's x86 /proc/cpuinfo, on which ONNX
# Runtime's CPU detection crashes (see arm_check.sh): bind a Pi 4-like one for the
# install's test prediction. The image itself never sees this file.
CPUINFO=$WORK/cpuinfo
: > "$CPUINFO"
for (( i=0; i<4; i++ )); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$i" >> "$CPUINFO"
done
printf 'Model\t\t: Raspberry Pi 4 Model B (emulated)\n' >> "$CPUINFO"
mount --bind "$CPUINFO" "$ROOT/proc/cpuinfo"
MOUNTS+=("$ROOT/proc/cpuinfo")
mkdir -p "$ROOT/tmp/fillmask"
tar -C "$ROOT/tmp/fillmask" -xzf "$ARCHIVE"
INSTALL_OPTS=(--no-start)
[ "$KIOSK" = yes ] && INSTALL_OPTS+=(--kiosk)
in_root "$ROOT" sh "/tmp/fillmask/$DIST/install.sh" "${INSTALL_OPTS[@]}" 2>&1 | sed 's/^/    /'
[ "${PIPESTATUS[0]}" = 0 ] || die "install.sh failed inside $ROOT (see above)"
[ -L "$ROOT/etc/systemd/system/multi-user.target.wants/fillmask-edge.service" ] \
    || die "install.sh did not enable fillmask-edge.service in $ROOT"
rm -rf "$ROOT/tmp/fillmask"
lap

step "the image's own files (settings, first boot, network, SSH, fstab)"
LIB=$ROOT/usr/local/lib/fillmask-edge
mkdir -p "$LIB" "$ROOT/boot/firmware"
install -m 0755 "$HERE/boot_settings.py" "$LIB/boot_settings.py"
install -m 0755 "$HERE/firstboot.sh" "$LIB/firstboot.sh"
install -m 0644 "$HERE/fillmask-board-settings.service" "$HERE/fillmask-firstboot.service" "$ROOT/etc/systemd/system/"
sed "s/@KIOSK@/$( [ "$KIOSK" = yes ] && echo on || echo off)/" "$HERE/fillmask.txt" > "$ROOT/boot/firmware/fillmask.txt"
in_root "$ROOT" python3 /usr/local/lib/fillmask-edge/boot_settings.py check /boot/firmware/fillmask.txt \
    $( [ "$KIOSK" = yes ] && echo --kiosk) | sed 's/^/    fillmask.txt: /'
echo fillmask > "$ROOT/etc/hostname"
# The system locale (C.UTF-8 is built into glibc: no locales package): without this
# file pam_env logs an error at every PAM session (the kiosk's, an SSH login).
echo LANG=C.UTF-8 > "$ROOT/etc/default/locale"
cat > "$ROOT/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	fillmask
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
cat > "$ROOT/etc/fstab" <<'EOF'
# The card: FAT boot partition (firmware, kernel, fillmask.txt) and the ext4 root.
LABEL=RASPIROOT  /              ext4  rw,noatime,errors=remount-ro  0 1
LABEL=RASPIFIRM  /boot/firmware vfat  rw,noatime,umask=0022         0 2
EOF
mkdir -p "$ROOT/etc/systemd/network"
cat > "$ROOT/etc/systemd/network/20-wired.network" <<'EOF'
[Match]
Name=eth* en*

[Network]
DHCP=yes
EOF
cat > "$ROOT/etc/systemd/network/25-wireless.network" <<'EOF'
# Wi-Fi (wpa_supplicant@wlan0, configured from /boot/firmware/fillmask.txt).
[Match]
Name=wlan*

[Network]
DHCP=yes
EOF
# The serial terminal takes its port from a login console there (serial = ttyS1:
# the GPIO UART is also the kernel console in cmdline.txt).
mkdir -p "$ROOT/etc/systemd/system/fillmask-edge-serial@.service.d"
cat > "$ROOT/etc/systemd/system/fillmask-edge-serial@.service.d/image.conf" <<'EOF'
# fillmask-edge image: this port belongs to the fill-in-the-blank terminal.
[Unit]
Conflicts=serial-getty@%i.service
After=serial-getty@%i.service fillmask-board-settings.service
EOF
mkdir -p "$ROOT/etc/ssh/sshd_config.d"
cat > "$ROOT/etc/ssh/sshd_config.d/fillmask.conf" <<'EOF'
# fillmask-edge image: keys only; root's keys come from /boot/firmware/fillmask.txt
# (ssh_key = ...), written to /etc/ssh/fillmask_authorized_keys at boot.
PasswordAuthentication no
KbdInteractiveAuthentication no
Match User root
    AuthorizedKeysFile .ssh/authorized_keys /etc/ssh/fillmask_authorized_keys
EOF
in_root "$ROOT" systemctl enable systemd-networkd.service systemd-resolved.service systemd-timesyncd.service \
    fillmask-firstboot.service fillmask-board-settings.service 2>&1 | grep -v '^Created symlink' | sed 's/^/    /' || true
in_root "$ROOT" systemctl disable ssh.service 2>&1 | grep -v '^Removed' | sed 's/^/    /' || true
# No interactive first-boot questions on a board without a keyboard.
in_root "$ROOT" systemctl mask systemd-firstboot.service >/dev/null 2>&1 || true
ln -sf /run/systemd/resolve/stub-resolv.conf "$ROOT/etc/resolv.conf"
# Fresh per card: machine-id (empty = systemd makes one at first boot), SSH host keys.
: > "$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id" "$ROOT"/etc/ssh/ssh_host_*
rm -f "$ROOT/usr/sbin/policy-rc.d"
rm -rf "$ROOT"/tmp/* "$ROOT"/var/tmp/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/log/apt/* "$ROOT"/root/.cache
find "$ROOT/var/log" -type f -exec truncate -s 0 {} +
umount "$ROOT/proc/cpuinfo"
cleanup
KERNEL=$(ls "$ROOT"/boot/vmlinuz-* | sed 's|.*/vmlinuz-||' | sort -V | tail -n 1)
[ -f "$ROOT/boot/firmware/cmdline.txt" ] && [ -f "$ROOT/boot/firmware/config.txt" ] \
    || die "raspi-firmware did not write /boot/firmware/cmdline.txt and config.txt in $ROOT"
[ -f "$ROOT/boot/firmware/vmlinuz-$KERNEL" ] || die "no vmlinuz-$KERNEL on the boot partition (raspi-firmware's kernel hook)"
echo "    kernel $KERNEL; cmdline.txt: $(cat "$ROOT/boot/firmware/cmdline.txt")"
echo "    device trees: $(cd "$ROOT/boot/firmware" && ls bcm2*.dtb | tr '\n' ' ')"
lap

# -- 4. the card image --------------------------------------------------------------------
step "partitions and file systems (loop devices)"
BOOT_MB=256
BOOT_USED=$(du -sm "$ROOT/boot/firmware" | cut -f1)
[ "$BOOT_USED" -lt $(( BOOT_MB - 16 )) ] || die "the boot files take ${BOOT_USED} MiB: more than the ${BOOT_MB} MiB partition"
ROOT_USED=$(du -sm --exclude=./boot/firmware "$ROOT" | cut -f1)
# Room for the first boot (journal, a bundle update) until the root grows to the card.
ROOT_MB=$(( ROOT_USED * 115 / 100 + 300 ))
IMG=$WORK/$NAME.img
truncate -s $(( (4 + BOOT_MB + ROOT_MB) ))M "$IMG"
# MBR: FAT32 (LBA, type c, bootable) for the Pi firmware, then Linux.
sfdisk -q "$IMG" <<EOF
label: dos
start=4MiB, size=${BOOT_MB}MiB, type=c, bootable
start=$(( 4 + BOOT_MB ))MiB, type=83
EOF
sfdisk -d "$IMG" | grep '^/' | sed 's/^/    /'
part_range() {  # part_range N -> "start-byte size-bytes" of partition N of $IMG
    sfdisk -d "$IMG" | sed -n "s|^$IMG$1 : start= *\([0-9]*\), size= *\([0-9]*\).*|\1 \2|p" \
        | { read -r start size; echo $(( start * 512 )) $(( size * 512 )); }
}
read -r BOOT_OFF BOOT_SIZE < <(part_range 1)
read -r ROOT_OFF ROOT_SIZE < <(part_range 2)
ROOT_LOOP=$(losetup --find --show --offset "$ROOT_OFF" --sizelimit "$ROOT_SIZE" "$IMG")
LOOPS+=("$ROOT_LOOP")
mkfs.ext4 -q -L RASPIROOT "$ROOT_LOOP"
MNT=$WORK/mnt
mkdir -p "$MNT"
mount "$ROOT_LOOP" "$MNT"; MOUNTS+=("$MNT")
mkdir -p "$MNT/boot/firmware"
lap
step "copying the root ($ROOT_USED MiB) and the boot files ($BOOT_USED MiB) onto the card image"
(cd "$ROOT" && tar --numeric-owner --xattrs --xattrs-include='*' --acls --one-file-system \
    --exclude=./boot/firmware -cf - .) | (cd "$MNT" && tar --numeric-owner --xattrs --xattrs-include='*' --acls -xpf -)
sync
echo "    root: $(df -m "$MNT" | awk 'NR==2 {print $3 " MiB used of " $2}')"
umount "$MNT"
MOUNTS=()
e2fsck -fy "$ROOT_LOOP" >/dev/null 2>&1 || [ $? -le 1 ] || die "e2fsck found errors on the root file system of $IMG"
losetup -d "$ROOT_LOOP"
LOOPS=()
# The FAT partition: made as a file with mtools (no vfat driver needed on this
# machine), checked, then written into its place. FAT has no owners or links.
BOOT_IMG=$WORK/boot.img
rm -f "$BOOT_IMG"
mkfs.vfat -F 32 -n RASPIFIRM -C "$BOOT_IMG" $(( BOOT_SIZE / 1024 )) >/dev/null
export MTOOLS_SKIP_CHECK=1
(cd "$ROOT/boot/firmware" && mcopy -i "$BOOT_IMG" -s -Q -m ./* ::/) || die "mcopy onto $BOOT_IMG failed"
fsck.vfat -n "$BOOT_IMG" >/dev/null || die "fsck.vfat found errors in $BOOT_IMG"
dd if="$BOOT_IMG" of="$IMG" bs=1M seek=$(( BOOT_OFF / 1048576 )) conv=notrunc,sparse status=none
rm -f "$BOOT_IMG"
mdir -i "$IMG@@$BOOT_OFF" -b ::/ > "$WORK/boot-files.txt" || die "the boot partition of $IMG does not read back"
for f in config.txt cmdline.txt fillmask.txt start4.elf bootcode.bin "vmlinuz-$KERNEL" "initrd.img-$KERNEL"; do
    grep -qx "::/$f" "$WORK/boot-files.txt" || die "$f is missing on the boot partition of $IMG"
done
echo "    boot: $(wc -l < "$WORK/boot-files.txt") files, $(minfo -i "$IMG@@$BOOT_OFF" ::/ >/dev/null 2>&1 && echo FAT32 RASPIFIRM)"
lap

# -- 5. compressed image, checksum, block map -------------------------------------------------
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
step "bmap, xz and sha256 into $OUTDIR"
rm -f "$OUTDIR/$NAME".img*
bmaptool create -o "$OUTDIR/$NAME.img.bmap" "$IMG"
if [ "$XZ" = yes ]; then
    "${NICE[@]}" xz -T2 -6 -c "$IMG" > "$OUTDIR/$NAME.img.xz"
    (cd "$OUTDIR" && sha256sum "$NAME.img.xz" > "$NAME.img.xz.sha256")
    OUT_IMG=$OUTDIR/$NAME.img.xz
    rm -f "$IMG"
else
    mv "$IMG" "$OUTDIR/$NAME.img"
    (cd "$OUTDIR" && sha256sum "$NAME.img" > "$NAME.img.sha256")
    OUT_IMG=$OUTDIR/$NAME.img
fi
lap
step "done in $(( $(date +%s) - START ))s"
RAW=$(( (4 + BOOT_MB + ROOT_MB) ))
echo "    $OUT_IMG: $(du -m "$OUT_IMG" | cut -f1) MiB compressed, $RAW MiB on the card before first boot grows the root"
echo "    boards: Raspberry Pi 3 A+/B/B+, CM3, 4 B, 400, CM4, Zero 2 W (device trees above; Debian's kernel $KERNEL + raspi-firmware); not the Pi 5"
echo "    flash: xzcat $OUT_IMG | sudo dd of=/dev/sdX bs=4M conv=fsync status=progress"
echo "    or:    sudo bmaptool copy $OUT_IMG /dev/sdX"
