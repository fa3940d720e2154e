"""systemd/: the units load cleanly, are hardened, and start the runtime as intended.

``systemd-analyze verify`` and ``systemd-analyze security --offline=true`` run on
every unit when systemd-analyze is installed (``apt-get install systemd``); the
HTTP unit must rate an exposure of at most 2.5. The ExecStart shell lines are run
with a fake Python to check which options each setting turns into.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge.affinity import parse_cpu_list

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
HTTP = "fillmask-edge.service"
SERIAL = "fillmask-edge-serial@.service"
KIOSK = "fillmask-edge-kiosk.service"
DEFAULTS = UNITS / "fillmask-edge.default"
VENV_PYTHON = "/opt/fillmask-edge/venv/bin/python"
MAX_EXPOSURE = {HTTP: 2.5, SERIAL: 2.5}  # the kiosk (a browser) is only recorded

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)")


def read_unit(name: str) -> dict[str, list[str]]:
    """Parse a unit file into {"Section.Key": [values...]} (continuations joined)."""
    entries: dict[str, list[str]] = {}
    section = ""
    pending = ""
    for raw in (UNITS / name).read_text(encoding="utf-8").splitlines():
        if not pending and raw.lstrip().startswith(("#", ";")):
            continue
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        line, pending = (pending + raw).strip(), ""
        if not line:
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


def verify_target(name: str) -> str:
    # A template is verified through an instance; systemd loads the template file.
    return str(UNITS / name.replace("@.", "@ttyUSB0."))


def test_unit_files_present():
    for name in (HTTP, SERIAL, KIOSK, DEFAULTS.name):
        assert (UNITS / name).is_file(), name


@needs_analyze
@pytest.mark.parametrize("name", [HTTP, SERIAL, KIOSK])
def test_systemd_analyze_verify(name):
    result = subprocess.run([ANALYZE, "verify", "--man=false", verify_target(name)],
                            capture_output=True, text=True, timeout=60)
    ours = [line for line in result.stderr.splitlines() if "fillmask" in line]
    assert result.returncode == 0 and not ours, result.stderr


@needs_analyze
@pytest.mark.parametrize("name", [HTTP, SERIAL, KIOSK])
def test_systemd_analyze_security(name):
    result = subprocess.run([ANALYZE, "security", "--offline=true", verify_target(name)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"{name}: exposure {exposure}")
    if name in MAX_EXPOSURE:
        assert exposure <= MAX_EXPOSURE[name], result.stdout


@pytest.mark.parametrize("name", [HTTP, SERIAL])
def test_hardening_and_limits(name):
    unit = read_unit(name)
    for key, value in {
        "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "CapabilityBoundingSet": "", "Restart": "on-failure",
        "SystemCallFilter": "@system-service",
    }.items():
        assert value in unit[f"Service.{key}"], key
    assert unit["Service.MemoryMax"] and unit["Service.EnvironmentFile"] == ["-/etc/default/fillmask-edge"]
    # Core 0 stays free for the system on a 4-core board.
    assert parse_cpu_list(unit["Service.CPUAffinity"][0]) == [1, 2, 3]


def test_serial_unit_binds_to_its_device_and_has_no_network():
    unit = read_unit(SERIAL)
    assert unit["Unit.BindsTo"] == ["dev-%i.device"] and unit["Unit.After"] == ["dev-%i.device"]
    assert unit["Service.SupplementaryGroups"] == ["dialout"]
    assert unit["Service.RestrictAddressFamilies"] == ["AF_UNIX"]
    assert unit["Service.PrivateNetwork"] == ["yes"] and unit["Service.DeviceAllow"] == ["/dev/%I rw"]


def test_http_unit_families():
    unit = read_unit(HTTP)
    assert unit["Service.RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]


def defaults() -> dict[str, str]:
    values = {}
    for line in DEFAULTS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"not KEY=value: {line!r}"
            assert not re.search(r"[\"'$`]", value), f"no shell syntax in {line!r}"
            values[key] = value
    return values


def test_default_file_covers_every_setting_the_units_use():
    used = set()
    for name in (HTTP, SERIAL, KIOSK):
        used |= set(re.findall(r"\bFILLMASK_[A-Z_]*[A-Z]", (UNITS / name).read_text(encoding="utf-8")))
    assert used - {"FILLMASK_API_TOKEN"} <= set(defaults()), used - set(defaults())
    assert defaults()["FILLMASK_HOST"] == "127.0.0.1"  # not on the LAN unless asked


def exec_start_argv(name: str, instance: str = "ttyUSB0") -> list[str]:
    """Split ExecStart the way systemd does for these lines: quotes, then %I and $$."""
    (line,) = read_unit(name)["Service.ExecStart"]
    argv = shlex.split(line.replace("%I", instance).replace("%i", instance))
    return [arg.replace("$$", "$") for arg in argv]


def run_exec_start(name: str, env: dict[str, str], tmp_path: Path) -> list[str]:
    """Run a unit's /bin/sh ExecStart with a fake venv Python; return the args it got."""
    argv = exec_start_argv(name)
    assert argv[:2] == ["/bin/sh", "-c"], argv
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n")
    fake.chmod(0o755)
    script = argv[2].replace(VENV_PYTHON, str(fake))
    unit = read_unit(name)
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for assignment in unit.get("Service.Environment", []):
        environment.update(item.split("=", 1) for item in shlex.split(assignment))
    environment.update(env)
    result = subprocess.run(["/bin/sh", "-c", script], env=environment, capture_output=True, text=True,
                            timeout=30, check=True)
    return result.stdout.splitlines()


def test_http_exec_start_options(tmp_path):
    args = run_exec_start(HTTP, {}, tmp_path)
    assert args == ["-m", "edge", "serve", "--host", "127.0.0.1", "--port", "8000"]
    args = run_exec_start(HTTP, {"FILLMASK_HOST": "0.0.0.0", "FILLMASK_BUNDLE": "/opt/my bundle",
                                 "FILLMASK_THREADS": "2", "FILLMASK_OPTIONS": "--spin --cache-size 64"}, tmp_path)
    assert args == ["-m", "edge", "serve", "--host", "0.0.0.0", "--port", "8000", "--bundle", "/opt/my bundle",
                    "--threads", "2", "--spin", "--cache-size", "64"]


def test_serial_exec_start_options(tmp_path):
    args = run_exec_start(SERIAL, {}, tmp_path)
    assert args == ["-m", "edge", "serial", "/dev/ttyUSB0", "--baud", "115200", "--mode", "terminal"]
    args = run_exec_start(SERIAL, {"FILLMASK_SERIAL_MODE": "line", "FILLMASK_SERIAL_OPTIONS": "--parity E"}, tmp_path)
    assert args == ["-m", "edge", "serial", "/dev/ttyUSB0", "--baud", "115200", "--mode", "line", "--parity", "E"]


def test_serial_arguments_accept_unit_options():
    """Every option the serial unit passes is one edge.serial_terminal defines."""
    import argparse

    from edge.serial_terminal import add_serial_arguments

    parser = argparse.ArgumentParser()
    add_serial_arguments(parser)
    parser.add_argument("--bundle")  # engine options come from the CLI's own parser
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(["/dev/ttyUSB0", "--baud", "115200", "--mode", "line", "--bundle", "b",
                              "--threads", "2", "--parity", "E"])
    assert (args.port, args.baud, args.mode, args.parity) == ("/dev/ttyUSB0", 115200, "line", "E")


@pytest.mark.skipif(shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"),
                    reason="needs taskset and sched_getaffinity")
def test_runtime_threads_follow_the_units_affinity():
    """Under the unit's CPUAffinity= (as far as this machine has those cores) the
    runtime picks one thread per core of the mask."""
    wanted = parse_cpu_list(read_unit(HTTP)["Service.CPUAffinity"][0])
    available = sorted(os.sched_getaffinity(0))
    cores = [c for c in wanted if c in available] or available[:1]
    code = "from edge.affinity import usable_cores, thread_count; print(usable_cores(), thread_count(None))"
    result = subprocess.run(["taskset", "-c", ",".join(map(str, cores)), sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=60, check=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.stdout.strip() == f"{cores} {len(cores)}"


SCRIPTS = {"tools/board/install.sh": "sh", "tools/board/uninstall.sh": "sh", "tools/board/make_dist.sh": "bash", "tools/board/arm_check.sh": "bash"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_deployment_scripts_parse(script):
    result = subprocess.run([SCRIPTS[script], "-n", str(ROOT / script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"


@pytest.mark.skipif(os.uname().machine == "aarch64", reason="checks the refusal on a non-ARM machine")
def test_install_refuses_the_wrong_machine_clearly(tmp_path):
    result = subprocess.run(["sh", str(ROOT / "tools/board/install.sh")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "run as root" in result.stderr or "aarch64" in result.stderr, result.stderr


def kiosk_shell(key: str) -> str:
    """The shell script of a kiosk unit's Exec line (/bin/sh -c '...'), $$ as $."""
    (line,) = read_unit(KIOSK)[f"Service.{key}"]
    argv = shlex.split(line)
    assert argv[:2] == ["/bin/sh", "-c"], argv
    return argv[2].replace("$$", "$")


def test_kiosk_can_reach_its_wayland_socket():
    # ProtectHome= also hides /run/user, the login session's XDG_RUNTIME_DIR, where
    # cage makes its Wayland socket ("Unable to open Wayland socket" under make
    # image-check KIOSK=1 when it was set).
    unit = read_unit(KIOSK)
    assert "Service.ProtectHome" not in unit or unit["Service.ProtectHome"] == ["no"]
    assert unit["Service.InaccessiblePaths"] == ["-/home -/root"]
    assert unit["Service.PAMName"] == ["login"]  # the session that gives cage its seat


@pytest.mark.parametrize("result, status, software", [
    ("signal", "SEGV", True), ("core-dump", "SEGV", True), ("signal", "ABRT", False),
    ("exit-code", "1", False), ("success", "0", False)])
def test_kiosk_falls_back_to_software_rendering_after_a_crash(tmp_path, result, status, software):
    unit = read_unit(KIOSK)
    assert unit["Service.RuntimeDirectory"] == ["fillmask-kiosk"]
    assert unit["Service.RuntimeDirectoryPreserve"] == ["restart"]
    env = dict(os.environ, SERVICE_RESULT=result, EXIT_STATUS=status, RUNTIME_DIRECTORY=str(tmp_path))
    subprocess.run(["sh", "-c", kiosk_shell("ExecStopPost")], env=env, check=True, timeout=30)
    assert (tmp_path / "software-rendering").exists() == software
    start = kiosk_shell("ExecStart")
    assert 'if [ -e "${RUNTIME_DIRECTORY}/software-rendering" ]; then export WLR_RENDERER=pixman; fi;' in start
    assert start.index("WLR_RENDERER") < start.index("exec /usr/bin/cage")


@pytest.mark.parametrize("token, marked", [("s3cret-Token", True), ("", False)])
def test_kiosk_start_opens_the_page_with_the_token_and_renderer(tmp_path, token, marked):
    """The ExecStart script with a fake cage and chromium: the URL (with #token= when
    one is set, so the page can ask the API) and the renderer cage gets."""
    fake_cage = tmp_path / "cage"
    fake_cage.write_text('#!/bin/sh\necho "renderer=${WLR_RENDERER:-gles2}"\nfor a in "$@"; do echo "$a"; done\n')
    fake_cage.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "chromium").write_text("#!/bin/sh\n")
    (bin_dir / "chromium").chmod(0o755)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if marked:
        (run_dir / "software-rendering").touch()
    script = kiosk_shell("ExecStart").replace(VENV_PYTHON, "true").replace("/usr/bin/cage", str(fake_cage))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FILLMASK_PORT": "8000", "FILLMASK_API_TOKEN": token,
           "RUNTIME_DIRECTORY": str(run_dir)}
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == f"renderer={'pixman' if marked else 'gles2'}"
    assert lines[-1] == "http://127.0.0.1:8000/" + (f"#token={token}" if token else "")
    assert "--kiosk" in lines and lines[lines.index("--") + 1] == str(bin_dir / "chromium")
