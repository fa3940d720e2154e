#!/bin/sh
# Remove fillmask-edge completely: stop and disable its units, delete the units and
# their drop-ins, /etc/default/fillmask-edge, /opt/fillmask-edge (venv, bundles)
# and the kiosk user if install.sh --kiosk created it.
#
#   sudo /opt/fillmask-edge/uninstall.sh
#
# The services ran with DynamicUser= and no state directories, so nothing else was
# written; their journal lines stay in the journal until it rotates.
set -eu

PREFIX=/opt/fillmask-edge
UNIT_DIR=/etc/systemd/system
DEFAULTS=/etc/default/fillmask-edge
KIOSK_USER=fillmask-kiosk

[ "$(id -u)" = 0 ] || { echo "uninstall: error: run as root (sudo $0)" >&2; exit 2; }

if [ -d /run/systemd/system ]; then
    # Every serial instance, running or only enabled.
    instances=$( { systemctl list-units --all --plain --no-legend 'fillmask-edge-serial@*.service' 2>/dev/null | awk '{print $1}'
                   ls "$UNIT_DIR"/*.wants/ 2>/dev/null | grep '^fillmask-edge-serial@.*\.service$'; } | sort -u)
    for unit in fillmask-edge.service fillmask-edge-kiosk.service $instances; do
        systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
fi
# Enablement links systemctl could not remove (no systemd running, e.g. a chroot).
find "$UNIT_DIR" -name 'fillmask-edge*.service' -type l -delete 2>/dev/null || true

rm -f "$UNIT_DIR"/fillmask-edge.service "$UNIT_DIR"/fillmask-edge-serial@.service "$UNIT_DIR"/fillmask-edge-kiosk.service
rm -rf "$UNIT_DIR"/fillmask-edge.service.d "$UNIT_DIR"/fillmask-edge-kiosk.service.d "$UNIT_DIR"/fillmask-edge-serial@*.service.d
rm -f "$DEFAULTS" "$DEFAULTS.dist"
rm -rf "$PREFIX"
if id "$KIOSK_USER" >/dev/null 2>&1; then
    userdel --remove "$KIOSK_USER" 2>/dev/null || userdel "$KIOSK_USER"
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl reset-failed 'fillmask-edge*' 2>/dev/null || true
fi
echo "fillmask-edge removed"
