# Shared by make_image.sh and arm_check.sh (sourced, bash): the host tools, arm64
# programs run by qemu user-mode through binfmt_misc, and the kernel file systems of an
# arm64 root for chroot. The sourcing script defines die().

# need_tools COMMAND:PACKAGE...: apt-get install the packages whose command is missing.
need_tools() {
    local pair missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "    installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# arm64 programs run by qemu-aarch64-static, also inside a chroot (the F flag: the
# interpreter is opened when registered, not looked up in the chroot).
enable_qemu_binfmt() {
    local binfmt=/proc/sys/fs/binfmt_misc
    [ -e $binfmt/register ] || mount -t binfmt_misc binfmt_misc $binfmt
    if ! grep -qs '^enabled' $binfmt/qemu-aarch64; then
        update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    fi
    grep -qs '^enabled' $binfmt/qemu-aarch64 || die "could not enable the qemu-aarch64 binfmt handler"
    grep -qs 'flags: .*F' $binfmt/qemu-aarch64 || die "qemu-aarch64 binfmt handler lacks the F flag (needed inside a chroot)"
}

# mount_api ROOT: proc, sys, dev and dev/pts into ROOT (those not mounted yet), each
# recorded in MOUNTS; umount_all undoes MOUNTS in reverse order.
MOUNTS=()
mount_api() {
    local root=$1 fs
    for fs in proc sys dev dev/pts; do
        mountpoint -q "$root/$fs" && continue
        case $fs in
            proc) mount -t proc proc "$root/proc" ;;
            sys) mount -t sysfs sysfs "$root/sys" ;;
            dev) mount --bind /dev "$root/dev" ;;
            dev/pts) mount --bind /dev/pts "$root/dev/pts" ;;
        esac
        MOUNTS+=("$root/$fs")
    done
}
umount_all() {
    local i
    for (( i=${#MOUNTS[@]}-1; i>=0; i-- )); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
    MOUNTS=()
}
