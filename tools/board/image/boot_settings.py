#!/usr/bin/python3
"""The boot-partition settings of the Raspberry Pi image: /boot/firmware/fillmask.txt.

One commented ``key = value`` file on the FAT partition, editable on any computer
after flashing. At every boot fillmask-board-settings.service runs

    python3 /usr/local/lib/fillmask-edge/boot_settings.py apply

before the fill-in-the-blank units, SSH and Wi-Fi start. Each setting is checked on
its own: a bad value is reported (journal at priority "err", the console, i.e. the
HDMI screen and the serial console, and /boot/firmware/fillmask-report.txt) and
leaves that one setting as it was; the others still apply. A setting that is absent
(or empty) takes the image's default. ``check FILE`` validates a file anywhere.

Runs with the system python3 and its standard library only (no venv needed).
It stays one file (parsing, checking and applying, ~470 lines) on purpose:
make_image.sh installs it alone as /usr/local/lib/fillmask-edge/boot_settings.py,
outside the product's package and venv, and the settings unit and make_image.sh's
own check run that one file with /usr/bin/python3.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SETTINGS_FILE = "/boot/firmware/fillmask.txt"
REPORT_FILE = "/boot/firmware/fillmask-report.txt"
DEFAULTS_FILE = "etc/default/fillmask-edge"
STATE_DIR = "var/lib/fillmask-board"
SERIAL_RULE = "etc/udev/rules.d/70-fillmask-serial.rules"
WPA_CONF = "etc/wpa_supplicant/wpa_supplicant-wlan0.conf"
SSH_KEYS = "etc/ssh/fillmask_authorized_keys"
SSH_DROPIN = "etc/ssh/sshd_config.d/fillmask.conf"
KIOSK_UNIT = "etc/systemd/system/fillmask-edge-kiosk.service"

DEFAULT_HOSTNAME = "fillmask"
KEYS = ("hostname", "lan", "api_token", "serial", "kiosk",
        "wifi_country", "wifi_ssid", "wifi_passphrase", "ssh_key")
REPEATABLE = {"ssh_key"}

# ISO 3166-1 alpha-2 codes that the Linux regulatory database knows (wireless-regdb),
# plus "00" (world).
COUNTRIES = set("""
AD AE AF AI AL AM AN AR AS AT AU AW AZ BA BB BD BE BF BG BH BL BM BN BO BR BS BT BY BZ
CA CF CH CI CL CN CO CR CU CX CY CZ DE DK DM DO DZ EC EE EG ES ET FI FM FR GB GD GE GF
GH GL GP GR GT GU GY HK HN HR HT HU ID IE IL IN IQ IR IS IT JM JO JP KE KH KN KP KR KW
KY KZ LB LC LI LK LS LT LU LV MA MC MD ME MF MH MK MN MO MP MQ MR MT MU MV MW MX MY NG
NI NL NO NP NZ OM PA PE PF PG PH PK PL PM PR PT PW PY QA RE RO RS RU RW SA SE SG SI SK
SN SR SV SY TC TD TG TH TN TR TT TW TZ UA UG US UY UZ VC VE VI VN VU WF WS YE YT ZA ZW 00
""".split())

SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                 "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
                 "sk-ecdsa-sha2-nistp256@openssh.com")
HOSTNAME_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=-]{8,256}$")
SERIAL_DEVICE_RE = re.compile(r"^(tty[A-Za-z]+[0-9]+|hvc[0-9]+)$")
ON = {"on", "yes", "true", "1", "enable", "enabled"}
OFF = {"off", "no", "false", "0", "disable", "disabled"}


@dataclass
class Problem:
    line: int  # 0: not tied to one line
    key: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.key}: {self.message}" if self.key else f"{where}{self.message}"


@dataclass
class Settings:
    """The valid settings (absent keys hold the defaults; a key with a bad value is
    missing from ``values``, so applying leaves that setting as it was)."""
    values: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _on_off(value: str) -> bool | None:
    low = value.lower()
    if low in ON:
        return True
    if low in OFF:
        return False
    return None


def wifi_psk(ssid: str, passphrase: str) -> str:
    """WPA2-PSK key as wpa_passphrase computes it (PBKDF2-HMAC-SHA1, 4096 rounds)."""
    return hashlib.pbkdf2_hmac("sha1", passphrase.encode(), ssid.encode(), 4096, 32).hex()


def check_value(key: str, value: str):
    """(parsed value, None) or (None, what is wrong) for one non-empty value."""
    if key == "hostname":
        name = value.lower()
        if not HOSTNAME_RE.match(name) or name.isdigit():
            return None, (f"{value!r} is not a host name (letters a-z, digits and '-', "
                          "1 to 63 characters, not starting or ending with '-')")
        return name, None
    if key in ("lan", "kiosk"):
        flag = _on_off(value)
        if flag is None:
            return None, f"{value!r}: write on or off"
        return flag, None
    if key == "api_token":
        if not TOKEN_RE.match(value):
            return None, ("must be 8 to 256 characters from A-Z a-z 0-9 . _ ~ + / = - "
                          f"(got {len(value)} characters{', with spaces' if ' ' in value else ''})")
        return value, None
    if key == "serial":
        words = [w for w in re.split(r"[\s,]+", value) if w]
        ports = []
        for word in words:
            word = word[5:] if word.startswith("/dev/") else word
            if word.lower() in ("usb", "off"):
                ports.append(word.lower())
            elif SERIAL_DEVICE_RE.match(word):
                ports.append(word)
            else:
                return None, (f"{word!r} is not a serial port: write usb (any USB adapter), "
                              "off, or device names such as ttyS1 ttyAMA0 ttyUSB0 ttyACM0")
        if "off" in ports and len(ports) > 1:
            return None, "off cannot be combined with ports"
        if ports == ["off"]:
            return [], None
        return sorted(set(ports), key=ports.index), None
    if key == "wifi_country":
        code = value.upper()
        if code not in COUNTRIES:
            return None, f"{value!r} is not a two-letter country code (e.g. CN, DE, GB, US)"
        return code, None
    if key == "wifi_ssid":
        if len(value.encode()) > 32:
            return None, f"is {len(value.encode())} bytes long; a Wi-Fi name has at most 32"
        return value, None
    if key == "wifi_passphrase":
        if re.fullmatch(r"[0-9a-fA-F]{64}", value):
            return value.lower(), None
        if not 8 <= len(value) <= 63 or any(not " " <= ch <= "~" for ch in value):
            return None, (f"a WPA passphrase has 8 to 63 printable ASCII characters "
                          f"(this one has {len(value)})")
        return value, None
    if key == "ssh_key":
        parts = value.split()
        if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES or not re.fullmatch(r"[A-Za-z0-9+/]+={0,3}", parts[1]):
            return None, ("not an SSH public key: paste one whole line of id_ed25519.pub "
                          "(it starts with ssh-ed25519, ssh-rsa or ecdsa-sha2-...)")
        return " ".join(parts), None
    raise KeyError(key)


def defaults(has_kiosk: bool) -> dict:
    return {"hostname": DEFAULT_HOSTNAME, "lan": False, "api_token": "", "serial": ["usb"],
            "kiosk": has_kiosk, "wifi_country": "", "wifi_ssid": "", "wifi_passphrase": "",
            "ssh_key": []}


def parse(text: str, has_kiosk: bool = False) -> Settings:
    """Read fillmask.txt's text: ``key = value`` lines, '#' starts a comment line."""
    result = Settings(values=defaults(has_kiosk))
    seen: dict = {}
    bad: set = set()
    keys: list = []
    text = text.lstrip("\ufeff")
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            result.problems.append(Problem(number, "", f"{line[:40]!r} is not 'key = value'"))
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        key = key.lower().replace("-", "_").replace(" ", "_")
        value = _unquote(value)
        if key not in KEYS:
            result.problems.append(Problem(number, key, f"unknown setting (known: {', '.join(KEYS)})"))
            continue
        if key in seen and key not in REPEATABLE:
            result.problems.append(Problem(number, key, f"set again (first on line {seen[key]}); the last one counts"))
            bad.discard(key)
        seen.setdefault(key, number)
        if not value:
            continue  # empty: the default
        parsed, error = check_value(key, value)
        if error:
            result.problems.append(Problem(number, key, error))
            bad.add(key)
            continue
        if key in REPEATABLE:
            if key not in keys:
                result.values[key] = []
            result.values[key].append(parsed)
        else:
            result.values[key] = parsed
        keys.append(key)
    # A bad repeatable value (one of several ssh keys) does not void the good ones.
    for key in bad - REPEATABLE:
        result.values.pop(key, None)
    if "ssh_key" in bad and not result.values.get("ssh_key"):
        result.values.pop("ssh_key", None)
    # Wi-Fi is one setting: any bad part leaves it as it was.
    if bad & {"wifi_country", "wifi_ssid", "wifi_passphrase"}:
        for key in ("wifi_country", "wifi_ssid", "wifi_passphrase"):
            result.values.pop(key, None)
    elif result.values.get("wifi_ssid"):
        if not result.values.get("wifi_country"):
            result.warnings.append(Problem(0, "wifi_country", "not set: the radio stays on the world "
                                           "regulatory domain (fewer channels, 5 GHz may not work)"))
    elif result.values.get("wifi_passphrase"):
        result.warnings.append(Problem(0, "wifi_passphrase", "set but wifi_ssid is not: Wi-Fi stays off"))
    if result.values.get("lan") and "api_token" in result.values and not result.values["api_token"]:
        result.warnings.append(Problem(0, "lan", "on without api_token: anyone on the network can use /api"))
    if not has_kiosk and result.values.get("kiosk"):
        result.problems.append(Problem(seen.get("kiosk", 0), "kiosk",
                                       "this image has no kiosk (build it with make image KIOSK=1)"))
        result.values["kiosk"] = False
    return result


# -- applying -----------------------------------------------------------------------------

def set_assignments(text: str, changes: dict) -> str:
    """Replace (or append) KEY=value lines of an /etc/default file, keep the rest."""
    lines = text.splitlines()
    done = set()
    for i, line in enumerate(lines):
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in changes:
            lines[i] = f"{key}={changes[key]}"
            done.add(key)
    for key, value in changes.items():
        if key not in done:
            lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def wpa_config(country: str, ssid: str, passphrase: str) -> str:
    lines = ["# Written at boot from /boot/firmware/fillmask.txt (edit that file instead).",
             "ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev", "update_config=0"]
    if country:
        lines.append(f"country={country}")
    lines += ["network={", f"    ssid={ssid.encode().hex()}"]
    if not passphrase:
        lines.append("    key_mgmt=NONE")
    else:
        psk = passphrase if re.fullmatch(r"[0-9a-f]{64}", passphrase) else wifi_psk(ssid, passphrase)
        lines.append(f"    psk={psk}")
    lines.append("}")
    return "\n".join(lines) + "\n"


class Board:
    """The system being changed: files under ``root`` and systemctl-style commands
    (tests pass a temporary root and record the commands instead of running them)."""

    def __init__(self, root: str = "/", run=None):
        self.root = Path(root)
        self.commands: list = []
        self._run = run

    def path(self, relative: str) -> Path:
        return self.root / relative

    def read(self, relative: str) -> str:
        try:
            return self.path(relative).read_text()
        except FileNotFoundError:
            return ""

    def write(self, relative: str, text: str, mode: int = 0o644) -> bool:
        """Write if different; True when the file changed."""
        path = self.path(relative)
        if path.exists() and path.read_text() == text and (path.stat().st_mode & 0o777) == mode:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".new")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        return True

    def remove(self, relative: str) -> bool:
        try:
            self.path(relative).unlink()
            return True
        except FileNotFoundError:
            return False

    def run(self, *argv: str) -> int:
        self.commands.append(list(argv))
        if self._run is not None:
            return self._run(list(argv))
        done = subprocess.run(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            print(f"<4>{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()[:200]}", flush=True)
        return done.returncode


def apply(settings: Settings, board: Board) -> list:
    """Make the system match the valid settings; returns what was done, in words."""
    values, done = settings.values, []

    if "hostname" in values:
        name = values["hostname"]
        if board.read("etc/hostname").strip() != name:
            board.write("etc/hostname", name + "\n")
            done.append(f"hostname {name}")
        hosts = [line for line in board.read("etc/hosts").splitlines() if not line.startswith("127.0.1.1")]
        hosts.insert(1 if hosts else 0, f"127.0.1.1\t{name}")
        board.write("etc/hosts", "\n".join(hosts) + "\n")
        board.run("hostname", name)

    changes = {}
    if "lan" in values:
        changes["FILLMASK_HOST"] = "0.0.0.0" if values["lan"] else "127.0.0.1"
    if "api_token" in values:
        changes["FILLMASK_API_TOKEN"] = values["api_token"]
    if changes:
        old = board.read(DEFAULTS_FILE)
        if board.write(DEFAULTS_FILE, set_assignments(old, changes)):
            done.append("service settings: " + ", ".join(
                f"{k}={'(set)' if k == 'FILLMASK_API_TOKEN' and v else v}" for k, v in changes.items()))

    if "serial" in values:
        done += _apply_serial(values["serial"], board)

    if "kiosk" in values and board.path(KIOSK_UNIT).exists():
        verb = "enable" if values["kiosk"] else "disable"
        board.run("systemctl", verb, "fillmask-edge-kiosk.service")
        if not values["kiosk"]:
            board.run("systemctl", "stop", "--no-block", "fillmask-edge-kiosk.service")
        done.append(f"kiosk {'on' if values['kiosk'] else 'off'}")

    if "wifi_ssid" in values:
        if values["wifi_ssid"]:
            changed = board.write(WPA_CONF, wpa_config(values.get("wifi_country", ""), values["wifi_ssid"],
                                                       values.get("wifi_passphrase", "")), 0o600)
            board.run("systemctl", "enable", "wpa_supplicant@wlan0.service")
            board.run("systemctl", "restart" if changed else "start", "--no-block", "wpa_supplicant@wlan0.service")
            done.append(f"Wi-Fi {values['wifi_ssid']!r} ({values.get('wifi_country') or 'no country'})")
        else:
            if board.remove(WPA_CONF):
                done.append("Wi-Fi off")
            board.run("systemctl", "disable", "wpa_supplicant@wlan0.service")
            board.run("systemctl", "stop", "--no-block", "wpa_supplicant@wlan0.service")

    if "ssh_key" in values:
        keys = values["ssh_key"]
        if keys:
            text = ("# root's SSH keys, written at boot from /boot/firmware/fillmask.txt\n"
                    + "\n".join(keys) + "\n")
            board.write(SSH_KEYS, text, 0o644)
            if not board.path("etc/ssh/ssh_host_ed25519_key").exists():
                board.run("ssh-keygen", "-A")
            board.run("systemctl", "enable", "ssh.service")
            board.run("systemctl", "start", "--no-block", "ssh.service")
            done.append(f"SSH on ({len(keys)} key{'s' if len(keys) > 1 else ''} for root)")
        else:
            board.remove(SSH_KEYS)
            board.run("systemctl", "disable", "ssh.service")
            board.run("systemctl", "stop", "--no-block", "ssh.service")
            done.append("SSH off (no ssh_key)")
    return done


def _apply_serial(ports: list, board: Board) -> list:
    done = []
    rule = ('# Written at boot from /boot/firmware/fillmask.txt (serial = usb): the\n'
            '# fill-in-the-blank terminal on every USB serial adapter while it is plugged in.\n'
            'ACTION=="add", SUBSYSTEM=="tty", KERNEL=="ttyUSB[0-9]*|ttyACM[0-9]*", TAG+="systemd", '
            'ENV{SYSTEMD_WANTS}+="fillmask-edge-serial@%k.service"\n')
    if "usb" in ports:
        changed = board.write(SERIAL_RULE, rule)
    else:
        changed = board.remove(SERIAL_RULE)
    if changed:
        board.run("udevadm", "control", "--reload")
        board.run("udevadm", "trigger", "--action=add", "--subsystem-match=tty")
    named = [p for p in ports if p != "usb"]
    state = STATE_DIR + "/serial-ports"
    before = board.read(state).split()
    for port in before:
        if port not in named:
            board.run("systemctl", "disable", "--now", f"fillmask-edge-serial@{port}.service")
            board.run("systemctl", "unmask", f"serial-getty@{port}.service")
    for port in named:
        # The terminal takes the port from a login console there (e.g. ttyS1).
        board.run("systemctl", "mask", f"serial-getty@{port}.service")
        board.run("systemctl", "stop", "--no-block", f"serial-getty@{port}.service")
        board.run("systemctl", "enable", f"fillmask-edge-serial@{port}.service")
        board.run("systemctl", "start", "--no-block", f"fillmask-edge-serial@{port}.service")
    board.write(state, " ".join(named) + "\n")
    done.append("serial terminal on " + (", ".join(
        (["USB adapters (ttyUSB*, ttyACM*)"] if "usb" in ports else []) + named) or "no port"))
    return done


def report_text(settings: Settings, done: list, path: str) -> str:
    lines = [f"# fillmask-edge: what the board made of {path} at "
             f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} (rewritten at every boot)"]
    lines += [f"ERROR   {p}" for p in settings.problems]
    lines += [f"WARNING {p}" for p in settings.warnings]
    lines += [f"applied {d}" for d in done]
    if not settings.problems:
        lines.append("no errors")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a settings file, change nothing")
    check.add_argument("file")
    check.add_argument("--kiosk", action="store_true", help="the image has the kiosk")
    run = sub.add_parser("apply", help="apply the settings file to this system (at boot)")
    run.add_argument("--file", default=SETTINGS_FILE)
    run.add_argument("--root", default="/")
    run.add_argument("--report", default=REPORT_FILE)
    args = parser.parse_args(argv)

    if args.command == "check":
        settings = parse(Path(args.file).read_text(encoding="utf-8", errors="replace"), args.kiosk)
        for p in settings.problems:
            print(f"error: {p}")
        for p in settings.warnings:
            print(f"warning: {p}")
        print("ok" if not settings.problems else f"{len(settings.problems)} error(s)")
        return 1 if settings.problems else 0

    board = Board(args.root)
    try:
        text = Path(args.file).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        print(f"<4>{args.file} not found: the image's defaults apply", flush=True)
        text = ""
    settings = parse(text, board.path(KIOSK_UNIT).exists())
    for p in settings.problems:
        print(f"<3>{args.file}: {p} (this setting was not applied; the others were)", flush=True)
    for p in settings.warnings:
        print(f"<4>{args.file}: {p}", flush=True)
    done = apply(settings, board)
    for d in done:
        print(f"<6>applied: {d}", flush=True)
    if args.report:
        try:
            Path(args.report).write_text(report_text(settings, done, args.file))
        except OSError as exc:
            print(f"<4>could not write {args.report}: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
