#!/bin/sh
# First boot of the fillmask-edge image (fillmask-firstboot.service): the root
# partition and file system grow to fill the card; fresh SSH host keys.
set -eu
ROOTDEV=$(findmnt -no SOURCE /)
NAME=$(basename "$(readlink -f "$ROOTDEV")")
PART=$(cat "/sys/class/block/$NAME/partition")
DISK=/dev/$(basename "$(readlink -f "/sys/class/block/$NAME/..")")
echo "growing partition $PART of $DISK ($ROOTDEV) to the end of the card"
# growpart exits 1 when there is nothing to grow (NOCHANGE).
out=$(growpart "$DISK" "$PART" 2>&1) || case "$out" in *NOCHANGE*) echo "$out";; *) echo "$out" >&2; exit 1;; esac
echo "$out" | grep -v '^$' || true
resize2fs "$ROOTDEV" 2>&1 | tail -n 1
echo "root file system: $(df -h / | awk 'NR==2 {print $2 " (" $4 " free)"}')"
rm -f /etc/ssh/ssh_host_*
ssh-keygen -A
echo "fresh SSH host keys: $(for f in /etc/ssh/ssh_host_*_key.pub; do ssh-keygen -lf "$f" | awk '{print $2}'; done | tr '\n' ' ')"
mkdir -p /var/lib/fillmask-board
touch /var/lib/fillmask-board/firstboot-done
