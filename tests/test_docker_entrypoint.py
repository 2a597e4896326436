"""docker/entrypoint.sh, run here under bash and under sh (the image's /bin/sh is dash, Debian's too), against
fake `nnunet_rndpo` / `nnUNetv2_*` / `python` executables on a temporary PATH, so that these tests depend neither
on the installed package nor on nnU-Net nor on a Docker engine. The Dockerfile and the image are tested in
tests/test_docker.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
ALLOWED_COMMANDS = ["nnUNetv2_", "nnunet_rndpo", "python", "python3", "bash", "sh"]
BIG_SHM_KB = str(8 * 1024 * 1024)  # 8 GiB: no warning expected

# --------------------------------------------------------------------------------------------------
# the entrypoint, run here
# --------------------------------------------------------------------------------------------------
SHELLS = [s for s in ("bash", "sh") if shutil.which(s)]


def _write_exe(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(0o755)
    return path


@pytest.fixture
def sandbox(tmp_path):
    """A temp folder with a fake-executables folder first on PATH and a clean, small environment."""
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    calls = tmp_path / "calls.log"
    # The fake package CLI records each call, so tests can tell whether the entrypoint asked it.
    _write_exe(
        fakebin,
        "nnunet_rndpo",
        f'echo "nnunet_rndpo $*" >> "{calls}"\n'
        'if [ "${1:-}" = env ]; then echo "export nnUNet_extTrainer=/x/y"; exit 0; fi\n'
        'echo "fake nnunet_rndpo $*"\n',
    )
    # A fake nnU-Net command that shows what it received: its arguments and the trainer variable.
    _write_exe(
        fakebin,
        "nnUNetv2_train",
        'printf "args:"; for a in "$@"; do printf " [%s]" "$a"; done; echo\n'
        'echo "extTrainer=${nnUNet_extTrainer:-<unset>}"\n'
        'exit "${FAKE_EXIT:-0}"\n',
    )
    # A fake interpreter: the machine may have no `python` at all; it knows no nnunet_rndpo.
    _write_exe(fakebin, "python", 'case "$*" in *nnunet_rndpo*) exit 1 ;; esac\necho "fake python $*"\n')
    env = {
        "PATH": f"{fakebin}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(home),
        "TMPDIR": str(tmp_path),
        "RNDPO_SHM_SIZE_KB": BIG_SHM_KB,
        "nnUNet_extTrainer": str(tmp_path),  # an existing folder: no warning
    }
    return {"tmp": tmp_path, "bin": fakebin, "env": env, "calls": calls}


def run_entrypoint(shell: str, args: list[str], env: dict[str, str], unset: tuple[str, ...] = ()):
    env = {k: v for k, v in env.items() if k not in unset}
    return subprocess.run([shell, str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30)


def _dry(env: dict[str, str]) -> dict[str, str]:
    return {**env, "RNDPO_ENTRYPOINT_DRY_RUN": "1"}


def _dry_lines(stdout: str) -> dict[str, str]:
    """{'command': 'cmd ...', 'mode': 'exec' | 'child', 'nnUNet_extTrainer': ..., 'HOME': ...} from the dry-run
    output."""
    out = {}
    for line in stdout.splitlines():
        for key in ("command", "mode"):
            if line.startswith(key + " "):
                out[key] = line[len(key) + 1 :]
        if line.startswith("env "):
            key, _, value = line[len("env ") :].partition("=")
            out[key] = value
    return out


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("args", [[], ["--help"], ["-h"], ["help"]])
def test_usage_without_command(shell, sandbox, args):
    result = run_entrypoint(shell, args, sandbox["env"])
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    for name in ("nnUNetv2_", "nnunet_rndpo", "--shm-size", "--gpus all", "nnUNetTrainerRNDPO"):
        assert name in result.stdout


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("command", ["touch", "ls", "/bin/sh", "nnUNetv2", "nnunet_rndpo_x", "pip"])
def test_disallowed_command_exits_2_with_allowed_list(shell, sandbox, command):
    sentinel = sandbox["tmp"] / "must-not-exist"
    result = run_entrypoint(shell, [command, str(sentinel)], sandbox["env"])
    assert result.returncode == 2
    assert not sentinel.exists()
    assert f"'{command}' is not an allowed command" in result.stderr
    for name in ALLOWED_COMMANDS:
        assert name in result.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_allowed_but_missing_command_exits_127(shell, sandbox):
    result = run_entrypoint(shell, ["nnUNetv2_no_such_command"], sandbox["env"])
    assert result.returncode == 127
    assert "not found" in result.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_dry_run_prints_the_command_and_runs_nothing(shell, sandbox):
    result = run_entrypoint(shell, ["nnunet_rndpo", "--help"], _dry(sandbox["env"]))
    assert result.returncode == 0, result.stderr
    assert _dry_lines(result.stdout)["command"] == "nnunet_rndpo --help"
    assert not sandbox["calls"].exists(), "dry run must not run the package CLI"


@pytest.mark.parametrize("shell", SHELLS)
def test_dry_run_quotes_arguments_so_they_split_back(shell, sandbox):
    argv = ["nnUNetv2_train", "4", "3d_fullres", "0", "-tr", "nnUNetTrainerRNDPO", "--x=a b", "it's", ""]
    result = run_entrypoint(shell, argv, _dry(sandbox["env"]))
    assert result.returncode == 0, result.stderr
    assert shlex.split(_dry_lines(result.stdout)["command"]) == argv


@pytest.mark.parametrize("shell", SHELLS)
def test_pass_through_execs_with_arguments_and_exit_code(shell, sandbox):
    env = {**sandbox["env"], "FAKE_EXIT": "3"}
    result = run_entrypoint(shell, ["nnUNetv2_train", "4", "3d_fullres", "0", "-tr", "nnUNetTrainerRNDPO"], env)
    assert result.returncode == 3
    assert "args: [4] [3d_fullres] [0] [-tr] [nnUNetTrainerRNDPO]" in result.stdout
    assert f"extTrainer={sandbox['tmp']}" in result.stdout


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "command",
    [["python", "-c", "print(1)"], ["sh", "-c", "echo 1"], ["bash", "-c", "echo 1"], ["nnunet_rndpo", "--help"]],
)
def test_debug_and_package_commands_pass_through(shell, sandbox, command):
    result = run_entrypoint(shell, command, _dry(sandbox["env"]))
    assert result.returncode == 0, result.stderr
    assert shlex.split(_dry_lines(result.stdout)["command"]) == command


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "command, on_terminal, mode",
    [
        (["nnUNetv2_train", "1"], False, "child"),
        (["nnUNetv2_train", "1"], True, "child"),
        (["nnunet_rndpo", "demo"], True, "child"),
        (["python", "-c", "print(1)"], False, "child"),
        (["bash", "-c", "echo 1"], False, "child"),
        (["bash"], True, "exec"),
        (["sh"], True, "exec"),
        (["python"], True, "exec"),
        (["python3"], True, "exec"),
    ],
)
def test_only_a_shell_or_interpreter_on_a_terminal_replaces_the_entrypoint(shell, sandbox, command, on_terminal, mode):
    env = {k: v for k, v in _dry(sandbox["env"]).items()}
    if on_terminal:
        leader, follower = os.openpty()
        try:
            result = subprocess.run(
                [shell, str(ENTRYPOINT), *command], env=env, stdin=follower, capture_output=True, text=True, timeout=30
            )
        finally:
            os.close(leader)
            os.close(follower)
    else:
        result = run_entrypoint(shell, command, env)
    assert result.returncode == 0, result.stderr
    assert _dry_lines(result.stdout)["mode"] == mode


def _signal_recording_command(sandbox) -> Path:
    """A fake nnUNetv2_train in Python that starts a worker process, like nnU-Net's augmentation workers, and
    records in signals.log which of the two got a KeyboardInterrupt; it tells when both run via started.log."""
    log = sandbox["tmp"] / "signals.log"
    # each process says it is up from inside its try block: a signal sent after that is caught and recorded
    worker = (
        "import sys, time\n"
        "try:\n"
        "    open(sys.argv[2], 'a').write('worker up\\n')\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    open(sys.argv[1], 'a').write('worker KeyboardInterrupt\\n')\n"
    )
    body = (
        f"#!{sys.executable}\n"
        "import subprocess, sys, time\n"
        f"log, started = {str(log)!r}, {str(sandbox['tmp'] / 'started.log')!r}\n"
        f"worker = subprocess.Popen([sys.executable, '-c', {worker!r}, log, started])\n"
        "try:\n"
        "    open(started, 'a').write('main up\\n')\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    open(log, 'a').write('main KeyboardInterrupt\\n')\n"
        "    worker.wait(10)\n"
        "    raise\n"
    )
    path = sandbox["bin"] / "nnUNetv2_train"
    path.write_text(body, encoding="utf-8")
    path.chmod(0o755)
    return log


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_reaches_the_command_and_its_workers_as_keyboard_interrupt(shell, sandbox, stop_signal):
    """docker stop: SIGTERM to the entrypoint (PID 1) ends the Python command through KeyboardInterrupt, in the
    main process and in the processes it started, and the entrypoint exits with the command's status."""
    log = _signal_recording_command(sandbox)
    started = sandbox["tmp"] / "started.log"
    process = subprocess.Popen(
        [shell, str(ENTRYPOINT), "nnUNetv2_train", "1"],
        env=sandbox["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as docker starts PID 1: SIGINT at its default. A pytest started in the background of a shell inherits
        # SIGINT ignored, and a shell cannot trap a signal ignored on entry: the test would then wait in vain
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 20
        while not (started.exists() and {"main up", "worker up"} <= set(started.read_text().splitlines())):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the fake command did not start its worker"
            time.sleep(0.05)
        process.send_signal(stop_signal)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert sorted(log.read_text().splitlines()) == ["main KeyboardInterrupt", "worker KeyboardInterrupt"]
    name = stop_signal.name
    assert f"{name} received; passing SIGINT on to nnUNetv2_train" in stderr
    assert f"nnUNetv2_train exited with status 130 after {name}" in stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_child_keeps_the_entrypoints_stdin(shell, sandbox):
    _write_exe(sandbox["bin"], "nnUNetv2_cat", "cat\n")
    result = subprocess.run(
        [shell, str(ENTRYPOINT), "nnUNetv2_cat"],
        env=sandbox["env"],
        input="from stdin\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "from stdin\n"


COMPILERS = ("cc", "gcc", "clang")


@pytest.fixture
def without_compilers(sandbox):
    """The sandbox's environment with a PATH of the machine's tools minus any C compiler (a runtime image)."""
    tools = sandbox["tmp"] / "tools"
    tools.mkdir()
    for folder in ("/usr/bin", "/bin"):
        for entry in Path(folder).iterdir():
            name = entry.name
            if name in COMPILERS or re.match(r"(x86_64|aarch64|.*-linux-gnu)-|gcc-|clang-", name):
                continue
            if not (tools / name).exists() and os.access(entry, os.X_OK):
                (tools / name).symlink_to(entry)
    env = {**sandbox["env"], "PATH": f"{sandbox['bin']}{os.pathsep}{tools}"}
    assert all(shutil.which(c, path=env["PATH"]) is None for c in COMPILERS)
    return env


@pytest.mark.parametrize("shell", SHELLS)
def test_compile_is_turned_off_without_a_c_compiler(shell, sandbox, without_compilers):
    dry = run_entrypoint(shell, ["nnUNetv2_train", "1"], _dry(without_compilers), unset=("nnUNet_compile", "CC"))
    assert dry.returncode == 0, dry.stderr
    assert _dry_lines(dry.stdout)["nnUNet_compile"] == "false"
    assert "no C compiler" in dry.stderr and "nnUNet_compile=false" in dry.stderr
    # exported to the command, and said only where nnU-Net would compile
    _write_exe(sandbox["bin"], "nnunet_rndpo", 'echo "compile=${nnUNet_compile:-<unset>}"\n')
    package = run_entrypoint(shell, ["nnunet_rndpo", "demo"], without_compilers, unset=("nnUNet_compile", "CC"))
    assert package.returncode == 0, package.stderr
    assert "compile=false" in package.stdout
    assert "no C compiler" not in package.stderr


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "setting, expected", [({"nnUNet_compile": "true"}, "true"), ({"CC": "/opt/my/cc"}, ""), ({"cc": None}, "")]
)
def test_compile_setting_is_left_alone_with_a_compiler_or_a_users_choice(
    shell, sandbox, without_compilers, setting, expected
):
    env = _dry(without_compilers)
    if "cc" in setting:
        _write_exe(sandbox["bin"], "cc", "exit 0\n")
    else:
        env.update(setting)
    unset = tuple(name for name in ("nnUNet_compile", "CC") if name not in setting)
    result = run_entrypoint(shell, ["nnUNetv2_train", "1"], env, unset=unset)
    assert result.returncode == 0, result.stderr
    assert _dry_lines(result.stdout)["nnUNet_compile"] == expected
    assert "no C compiler" not in result.stderr


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("unset_how", ["unset", "empty"])
def test_unset_ext_trainer_is_derived_from_nnunet_rndpo_env(shell, sandbox, unset_how):
    env = dict(sandbox["env"])
    if unset_how == "empty":
        env["nnUNet_extTrainer"] = ""
    unset = ("nnUNet_extTrainer",) if unset_how == "unset" else ()
    # Really exec'd: the variable must be exported to the command, not only printed.
    result = run_entrypoint(shell, ["nnUNetv2_train", "1"], env, unset=unset)
    assert result.returncode == 0, result.stderr
    assert "extTrainer=/x/y" in result.stdout
    assert "nnUNet_extTrainer was not set; using /x/y" in result.stderr
    assert "nnunet_rndpo env" in sandbox["calls"].read_text()
    dry = run_entrypoint(shell, ["nnunet_rndpo", "--help"], _dry(env), unset=unset)
    assert _dry_lines(dry.stdout)["nnUNet_extTrainer"] == "/x/y"


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "printed",
    [
        "export nnUNet_extTrainer='/opt/a b/trainers'",
        'export nnUNet_extTrainer="/opt/a b/trainers"',
        "# a comment first\n  export nnUNet_extTrainer=/opt/a b/trainers",
    ],
)
def test_derived_ext_trainer_accepts_quoted_export_lines(shell, sandbox, printed):
    _write_exe(sandbox["bin"], "nnunet_rndpo", f"cat <<'EOF'\n{printed}\nEOF\n")
    result = run_entrypoint(shell, ["nnUNetv2_train"], sandbox["env"], unset=("nnUNet_extTrainer",))
    assert result.returncode == 0, result.stderr
    assert "extTrainer=/opt/a b/trainers" in result.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_ext_trainer_falls_back_to_python_when_cli_fails(shell, sandbox):
    _write_exe(sandbox["bin"], "nnunet_rndpo", "echo broken >&2; exit 1\n")
    _write_exe(sandbox["bin"], "python", 'case "$*" in *nnunet_rndpo.trainers*) echo /from/python;; esac\n')
    result = run_entrypoint(shell, ["nnUNetv2_train"], sandbox["env"], unset=("nnUNet_extTrainer",))
    assert result.returncode == 0, result.stderr
    assert "extTrainer=/from/python" in result.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_ext_trainer_not_derivable_warns_and_still_runs(shell, sandbox):
    _write_exe(sandbox["bin"], "nnunet_rndpo", "exit 1\n")
    for py in ("python", "python3"):  # shadow any system interpreter
        _write_exe(sandbox["bin"], py, "exit 1\n")
    result = run_entrypoint(shell, ["nnUNetv2_train"], sandbox["env"], unset=("nnUNet_extTrainer",))
    assert result.returncode == 0
    assert "extTrainer=<unset>" in result.stdout
    assert "could not be derived" in result.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_set_ext_trainer_is_kept_and_checked(shell, sandbox):
    env = {**sandbox["env"], "nnUNet_extTrainer": f"{sandbox['tmp']}{os.pathsep}/no/such/folder"}
    result = run_entrypoint(shell, ["nnUNetv2_train"], env)
    assert result.returncode == 0, result.stderr
    assert f"extTrainer={sandbox['tmp']}{os.pathsep}/no/such/folder" in result.stdout
    assert "'/no/such/folder', which is not a folder" in result.stderr
    assert str(sandbox["tmp"]) + "'" not in result.stderr  # the existing entry is not complained about
    assert not sandbox["calls"].exists(), "a set variable must not be re-derived"


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "size_kb, warns", [("65536", True), ("1048575", True), ("1048576", False), (BIG_SHM_KB, False)]
)
def test_small_shm_warns(shell, sandbox, size_kb, warns):
    env = {**sandbox["env"], "RNDPO_SHM_SIZE_KB": size_kb}
    result = run_entrypoint(shell, ["nnunet_rndpo", "--help"], _dry(env))
    assert result.returncode == 0, result.stderr
    if warns:
        assert "--shm-size=8g" in result.stderr and "--ipc=host" in result.stderr
        assert f"only {int(size_kb) // 1024} MiB" in result.stderr
    else:
        assert "shm" not in result.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_shm_check_measures_a_real_folder_and_reports_a_missing_one(shell, sandbox):
    env = {k: v for k, v in sandbox["env"].items() if k != "RNDPO_SHM_SIZE_KB"}
    measured = run_entrypoint(shell, ["nnunet_rndpo", "--help"], _dry({**env, "RNDPO_SHM_PATH": "/"}))
    assert measured.returncode == 0, measured.stderr
    assert "could not determine" not in measured.stderr  # df gave a number
    missing = run_entrypoint(
        shell, ["nnunet_rndpo", "--help"], _dry({**env, "RNDPO_SHM_PATH": str(sandbox["tmp"] / "no-shm")})
    )
    assert missing.returncode == 0
    assert "does not exist" in missing.stderr and "--shm-size=8g" in missing.stderr


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("home", [None, "/no/such/home"])
def test_unusable_home_is_replaced_by_a_writable_folder(shell, sandbox, home):
    env = dict(sandbox["env"])
    unset = ()
    if home is None:
        unset = ("HOME",)
    else:
        env["HOME"] = home
    result = run_entrypoint(shell, ["nnunet_rndpo", "--help"], _dry(env), unset=unset)
    assert result.returncode == 0, result.stderr
    new_home = Path(_dry_lines(result.stdout)["HOME"])
    assert new_home.parent == sandbox["tmp"] and new_home.is_dir()


@pytest.mark.parametrize("shell", SHELLS)
def test_home_problem_is_a_warning_not_a_failure(shell, sandbox):
    env = {**sandbox["env"], "TMPDIR": str(sandbox["tmp"] / "missing" / "x")}
    (sandbox["tmp"] / "missing").write_text("a file, so no folder can be created below it")
    result = run_entrypoint(shell, ["nnUNetv2_train", "1"], env, unset=("HOME",))
    assert result.returncode == 0, result.stderr
    assert "args: [1]" in result.stdout
    assert "could not be created" in result.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_usable_home_is_kept(shell, sandbox):
    result = run_entrypoint(shell, ["nnunet_rndpo", "--help"], _dry(sandbox["env"]))
    assert _dry_lines(result.stdout)["HOME"] == sandbox["env"]["HOME"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write everywhere")
@pytest.mark.parametrize("shell", SHELLS)
def test_read_only_results_folder_warns(shell, sandbox):
    results = sandbox["tmp"] / "results"
    results.mkdir()
    results.chmod(0o555)
    try:
        env = {**sandbox["env"], "nnUNet_results": str(results)}
        result = run_entrypoint(shell, ["nnunet_rndpo", "--help"], _dry(env))
    finally:
        results.chmod(0o755)
    assert result.returncode == 0
    assert "nnUNet_results" in result.stderr and "not writable" in result.stderr


def test_entrypoint_is_executable_posix_sh_with_valid_syntax():
    assert ENTRYPOINT.exists()
    assert os.access(ENTRYPOINT, os.X_OK), "chmod +x docker/entrypoint.sh (the image also sets the bit)"
    assert ENTRYPOINT.read_text(encoding="utf-8").startswith("#!/bin/sh\n")
    for shell in SHELLS:
        result = subprocess.run([shell, "-n", str(ENTRYPOINT)], capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, result.stderr


def test_entrypoint_python_fallback_snippet_compiles():
    text = ENTRYPOINT.read_text(encoding="utf-8")
    snippets = re.findall(r"\"\$py\" -c '([^']*)'", text)
    assert len(snippets) == 1
    for code in snippets:
        compile(code, "entrypoint.sh", "exec")


def test_executable_bit_recorded_for_entrypoint():
    mode = ENTRYPOINT.stat().st_mode
    assert mode & stat.S_IXUSR and mode & stat.S_IXGRP and mode & stat.S_IXOTH
