"""The Raspberry Pi image's boot-partition settings (tools/board/image/boot_settings.py)
and the image recipe's pieces that run without root: parsing, validation, applying
to a temporary root with recorded commands, the shipped template, the units."""

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "tools" / "board" / "image"
spec = importlib.util.spec_from_file_location("boot_settings", IMAGE / "boot_settings.py")
bs = importlib.util.module_from_spec(spec)
sys.modules["boot_settings"] = bs
spec.loader.exec_module(bs)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE6lUWh8oXZ1QbHH0Ak1E3i7yEQzQyq+7b0tFwXvZb1J me@laptop"


def parse(text, kiosk=False):
    return bs.parse(text, has_kiosk=kiosk)


def test_template_is_valid_and_gives_the_defaults():
    text = (IMAGE / "fillmask.txt").read_text().replace("@KIOSK@", "off")
    s = parse(text)
    assert s.problems == [] and s.warnings == []
    assert s.values == bs.defaults(False)
    kiosk = parse((IMAGE / "fillmask.txt").read_text().replace("@KIOSK@", "on"), kiosk=True)
    assert kiosk.problems == [] and kiosk.values["kiosk"] is True


def test_every_key_documented_in_the_template():
    text = (IMAGE / "fillmask.txt").read_text()
    for key in bs.KEYS:
        assert f"\n{key} =" in text, key


def test_values_parsed():
    s = parse(
        "\ufeffhostname = Kiosk-1\r\nlan = ON\r\napi_token = s3cret-token\r\n"
        "serial = usb, /dev/ttyS1 ttyS1\r\nwifi_country = de\r\nwifi_ssid = \"My Home Net \"\r\n"
        "wifi_passphrase = pass#word with spaces\r\nssh_key = " + KEY + "\r\nssh_key = " + KEY.replace("me@", "you@") + "\r\n")
    assert s.problems == [], s.problems
    v = s.values
    assert v["hostname"] == "kiosk-1" and v["lan"] is True and v["api_token"] == "s3cret-token"
    assert v["serial"] == ["usb", "ttyS1"]
    assert v["wifi_country"] == "DE" and v["wifi_ssid"] == "My Home Net " and v["wifi_passphrase"] == "pass#word with spaces"
    assert len(v["ssh_key"]) == 2


@pytest.mark.parametrize("line, key", [
    ("hostname = -bad", "hostname"), ("hostname = a_b", "hostname"), ("hostname = " + "a" * 64, "hostname"),
    ("lan = maybe", "lan"), ("api_token = short", "api_token"), ("api_token = has space inside", "api_token"),
    ("serial = COM3", "serial"), ("serial = off usb", "serial"), ("kiosk = sometimes", "kiosk"),
    ("wifi_country = XX", "wifi_country"), ("wifi_ssid = " + "x" * 33, "wifi_ssid"),
    ("wifi_passphrase = 1234567", "wifi_passphrase"), ("ssh_key = not-a-key AAAA", "ssh_key"),
    ("ssh_key = ssh-ed25519", "ssh_key"),
])
def test_bad_value_reported_and_not_applied_while_the_rest_applies(line, key):
    base = {"hostname": "good", "lan": "on", "api_token": "abcdefgh", "serial": "usb"}
    base.pop(key, None)
    text = "".join(f"{k} = {v}\n" for k, v in base.items()) + line + "\n"
    s = parse(text)
    assert [p.key for p in s.problems] == [key]
    assert s.problems[0].line == len(base) + 1
    assert key not in s.values  # that setting stays as it was on the board
    for other in base:
        assert other in s.values


def test_unknown_keys_and_junk_lines_reported():
    s = parse("colour = blue\njust words\nlan = on\n")
    assert [(p.line, p.key) for p in s.problems] == [(1, "colour"), (2, "")]
    assert s.values["lan"] is True


def test_duplicates_reported_last_counts():
    s = parse("lan = on\nlan = off\n")
    assert len(s.problems) == 1 and "first on line 1" in s.problems[0].message
    assert s.values["lan"] is False


def test_empty_values_are_defaults():
    s = parse("hostname =\nserial =\napi_token =\n")
    assert s.problems == [] and s.values == bs.defaults(False)


def test_serial_off_and_wifi_group():
    assert parse("serial = off\n").values["serial"] == []
    s = parse("wifi_ssid = net\nwifi_passphrase = short\n")
    assert [p.key for p in s.problems] == ["wifi_passphrase"]
    assert not {"wifi_ssid", "wifi_passphrase", "wifi_country"} & set(s.values)
    warn = parse("wifi_ssid = net\nwifi_passphrase = longenough\n")
    assert [w.key for w in warn.warnings] == ["wifi_country"]
    assert [w.key for w in parse("lan = on\n").warnings] == ["lan"]


def test_kiosk_on_without_kiosk_image():
    s = parse("kiosk = on\n", kiosk=False)
    assert [p.key for p in s.problems] == ["kiosk"] and s.values["kiosk"] is False


def test_one_bad_ssh_key_keeps_the_good_one():
    s = parse(f"ssh_key = {KEY}\nssh_key = garbage\n")
    assert [p.key for p in s.problems] == ["ssh_key"] and s.values["ssh_key"] == [KEY]


def test_wifi_psk_matches_wpa_passphrase():
    # IEEE 802.11i test vector (wpa_passphrase "IEEE" "password").
    assert bs.wifi_psk("IEEE", "password") == "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"
    if shutil.which("wpa_passphrase"):
        out = subprocess.run(["wpa_passphrase", "héllo net", "pass word!"], capture_output=True, text=True).stdout
        assert f"psk={bs.wifi_psk('héllo net', 'pass word!')}" in out


def test_set_assignments_keeps_comments_and_other_lines():
    text = "# FILLMASK_HOST=comment\nFILLMASK_HOST=127.0.0.1\nFILLMASK_PORT=8000\n"
    out = bs.set_assignments(text, {"FILLMASK_HOST": "0.0.0.0", "FILLMASK_API_TOKEN": "t0ken123"})
    assert out == "# FILLMASK_HOST=comment\nFILLMASK_HOST=0.0.0.0\nFILLMASK_PORT=8000\nFILLMASK_API_TOKEN=t0ken123\n"


def fake_board(tmp_path, kiosk=False):
    root = tmp_path / "root"
    (root / "etc/default").mkdir(parents=True)
    shutil.copy(REPO / "systemd" / "fillmask-edge.default", root / "etc/default/fillmask-edge")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tfillmask\n")
    if kiosk:
        (root / "etc/systemd/system").mkdir(parents=True)
        (root / bs.KIOSK_UNIT).write_text("[Unit]\n")
    return bs.Board(str(root), run=lambda argv: 0)


def test_apply_writes_files_and_runs_commands(tmp_path):
    board = fake_board(tmp_path)
    s = parse(f"hostname = lab-pi\nlan = on\napi_token = abcdefgh1\nserial = usb hvc0\n"
              f"wifi_country = GB\nwifi_ssid = Net\nwifi_passphrase = password1\nssh_key = {KEY}\n")
    done = bs.apply(s, board)
    root = board.root
    assert (root / "etc/hostname").read_text() == "lab-pi\n"
    assert "127.0.1.1\tlab-pi" in (root / "etc/hosts").read_text().splitlines()
    defaults = (root / bs.DEFAULTS_FILE).read_text()
    assert "FILLMASK_HOST=0.0.0.0\n" in defaults and "FILLMASK_API_TOKEN=abcdefgh1\n" in defaults
    assert defaults.count("FILLMASK_HOST=") == 1
    assert "fillmask-edge-serial@%k.service" in (root / bs.SERIAL_RULE).read_text()
    wpa = (root / bs.WPA_CONF).read_text()
    assert "country=GB" in wpa and f"ssid={'Net'.encode().hex()}" in wpa
    assert f"psk={bs.wifi_psk('Net', 'password1')}" in wpa and "password1" not in wpa
    assert (root / bs.WPA_CONF).stat().st_mode & 0o777 == 0o600
    assert KEY in (root / bs.SSH_KEYS).read_text()
    cmds = [" ".join(c) for c in board.commands]
    for expected in ["hostname lab-pi", "systemctl enable fillmask-edge-serial@hvc0.service",
                     "systemctl mask serial-getty@hvc0.service", "systemctl enable ssh.service",
                     "systemctl start --no-block ssh.service", "ssh-keygen -A",
                     "systemctl enable wpa_supplicant@wlan0.service", "udevadm control --reload"]:
        assert expected in cmds, expected
    assert any(d.startswith("SSH on") for d in done)


def test_apply_again_and_then_settings_removed(tmp_path):
    board = fake_board(tmp_path, kiosk=True)
    bs.apply(parse(f"serial = ttyS1\nssh_key = {KEY}\nwifi_ssid = open-net\nkiosk = off\n", kiosk=True), board)
    assert "key_mgmt=NONE" in (board.root / bs.WPA_CONF).read_text()
    assert ["systemctl", "disable", "fillmask-edge-kiosk.service"] in board.commands
    board.commands.clear()
    # The same file again: nothing rewritten, no udev reload.
    bs.apply(parse(f"serial = ttyS1\nssh_key = {KEY}\nwifi_ssid = open-net\nkiosk = off\n", kiosk=True), board)
    assert ["udevadm", "control", "--reload"] not in board.commands
    board.commands.clear()
    # Everything taken out of the file: back to the defaults.
    bs.apply(parse("", kiosk=True), board)
    cmds = [" ".join(c) for c in board.commands]
    assert "systemctl disable --now fillmask-edge-serial@ttyS1.service" in cmds
    assert "systemctl unmask serial-getty@ttyS1.service" in cmds
    assert "systemctl disable ssh.service" in cmds and not (board.root / bs.SSH_KEYS).exists()
    assert not (board.root / bs.WPA_CONF).exists()
    assert "systemctl enable fillmask-edge-kiosk.service" in cmds
    defaults = (board.root / bs.DEFAULTS_FILE).read_text()
    assert "FILLMASK_HOST=127.0.0.1\n" in defaults and "FILLMASK_API_TOKEN=\n" in defaults


def test_bad_token_leaves_the_old_one(tmp_path):
    board = fake_board(tmp_path)
    bs.apply(parse("api_token = goodtoken\n"), board)
    bs.apply(parse("api_token = bad token\n"), board)
    assert "FILLMASK_API_TOKEN=goodtoken\n" in (board.root / bs.DEFAULTS_FILE).read_text()


def test_cli_check_and_apply(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("lan = off\n")
    bad = tmp_path / "bad.txt"
    bad.write_text("lan = perhaps\nhostname = ok-name\n")
    script = str(IMAGE / "boot_settings.py")
    assert subprocess.run([sys.executable, script, "check", str(good)], capture_output=True).returncode == 0
    out = subprocess.run([sys.executable, script, "check", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and "line 1: lan" in out.stdout


def test_report_text():
    s = parse("lan = perhaps\n")
    text = bs.report_text(s, ["hostname fillmask"], "/boot/firmware/fillmask.txt")
    assert "ERROR   line 1: lan" in text and "applied hostname fillmask" in text


def test_runs_with_stdlib_only():
    """The image runs it with Debian's python3 and no venv: stdlib imports only."""
    import ast
    tree = ast.parse((IMAGE / "boot_settings.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


def test_package_lists_and_scripts():
    for name in ("packages.txt", "packages-kiosk.txt"):
        words = [w for line in (IMAGE / name).read_text().splitlines()
                 for w in line.split("#", 1)[0].split()]
        assert words and all(w == w.lower() for w in words)
    base = (IMAGE / "packages.txt").read_text()
    for pkg in ("raspi-firmware", "linux-image-arm64", "fonts-wqy-microhei", "fonts-noto-color-emoji", "python3"):
        assert f"\n{pkg}\n" in base
    kiosk = (IMAGE / "packages-kiosk.txt").read_text()
    # cage needs Xwayland, and polkit for logind to give it the display (seen live).
    for pkg in ("cage", "chromium", "xwayland", "polkitd"):
        assert f"\n{pkg}\n" in kiosk
    for script in ("make_image.sh", "image_check.sh", "chroot_lib.sh"):
        path = REPO / "tools" / "board" / script
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert subprocess.run(["sh", "-n", str(IMAGE / "firstboot.sh")]).returncode == 0


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_image_units_verify(tmp_path):
    for unit in ("fillmask-board-settings.service", "fillmask-firstboot.service"):
        shutil.copy(IMAGE / unit, tmp_path / unit)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in tmp_path.glob("*.service"))],
                         capture_output=True, text=True)
    # Only complaints about programs that exist on the image, not here.
    lines = [l for l in out.stderr.splitlines() if l.strip() and "/usr/local/lib/fillmask-edge/" not in l
             and "is not executable" not in l and "Command " not in l]
    assert not [l for l in lines if "fillmask" in l], out.stderr
