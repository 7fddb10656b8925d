"""The Docker files cannot be built here (no engine, no base images): check what can be
checked without one. Every file a Dockerfile copies exists, its pins are the Makefile's, its
entrypoint is our console script, and every `wsi-prune` command and option that the Docker docs
and compose file use exists in the CLI."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import click
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.gpu"]
PIN = re.compile(r'"?\b(torch|torchvision)==([0-9][0-9.]*)"?')


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _makefile_pins() -> dict[str, str]:
    lines = [ln for ln in (REPO / "Makefile").read_text().splitlines()
             if "pip install" in ln and "torch==" in ln]
    assert len(lines) == 1, lines
    return dict(PIN.findall(lines[0]))


def _makefile_package_install() -> str:
    lines = [ln for ln in (REPO / "Makefile").read_text().splitlines()
             if "pip install" in ln and "torch==" not in ln]
    assert len(lines) == 1, lines
    return lines[0]


def _cli() -> click.Group:
    from wsi_prune.cli import main

    return main


def _check_wsi_prune_args(args: list[str], where: str) -> None:
    """``args`` after ``wsi-prune``: the command exists and knows every option given."""
    group = _cli()
    cmd = group.commands.get(args[0])
    assert cmd is not None, f"{where}: `wsi-prune {args[0]}` is not a command"
    while isinstance(cmd, click.Group):
        args = args[1:]
        cmd = cmd.commands.get(args[0])
        assert cmd is not None, f"{where}: no subcommand {args[0]!r}"
    known = {opt for p in cmd.params for opt in p.opts + p.secondary_opts}
    for a in args[1:]:
        if a.startswith("--"):
            assert a.split("=")[0] in known, f"{where}: `wsi-prune {args[0]}` has no {a}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_file_exists_and_is_not_ignored(dockerfile: Path) -> None:
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    copies = [args for ins, args in _instructions(dockerfile) if ins in ("COPY", "ADD")]
    assert copies
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        for src in words[:-1]:
            assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src}: no such path"
            assert src.rstrip("/") not in ignored, f"{src} is excluded by .dockerignore"
    # what `pip install .` needs to build: pyproject and the readme it names
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    copied = {w for args in copies for w in shlex.split(args)[:-1]}
    assert {"pyproject.toml", project["readme"], "wsi_prune"} <= copied


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_install_steps_match_the_makefile(dockerfile: Path) -> None:
    runs = [args for ins, args in _instructions(dockerfile) if ins == "RUN"]
    pip = [r for r in runs if "pip install" in r]
    assert len(pip) == 2, pip
    # 1. torch and torchvision first, with exactly the Makefile's pins
    assert dict(PIN.findall(pip[0])) == _makefile_pins()
    # 2. then the package itself (not editable, no dev extras in an image)
    assert pip[1].split("pip install", 1)[1].split()[-1] == "."
    assert '-e ".[dev]"' in _makefile_package_install()
    # and the Makefile's pins are the package's own
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, version in _makefile_pins().items():
        assert f"{name}=={version}" in deps


def test_cpu_and_gpu_images_differ_only_in_torch_wheels() -> None:
    cpu, gpu = (_instructions(p) for p in DOCKERFILES)
    assert [i for i in cpu if "pip install" not in i[1]] == \
        [i for i in gpu if "pip install" not in i[1] and i[0] != "ARG"]
    assert "whl/cpu" in cpu[[i for i, (ins, a) in enumerate(cpu) if "torch==" in a][0]][1]
    gpu_torch = next(a for ins, a in gpu if "torch==" in a)
    assert "whl/${TORCH_CUDA}" in gpu_torch
    assert ("ARG", "TORCH_CUDA=cu128") in gpu


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_user_and_mounts(dockerfile: Path) -> None:
    ins = _instructions(dockerfile)
    assert ins[0] == ("FROM", "python:3.11-slim")
    entry = [a for i, a in ins if i == "ENTRYPOINT"]
    assert entry == ['["wsi-prune"]']
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["wsi-prune"].partition(":")
    assert isinstance(getattr(__import__(module, fromlist=[func]), func), click.Group)
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    run_text = " ".join(a for i, a in ins if i == "RUN")
    assert "useradd" in run_text and "mkdir -p /data /out" in run_text
    # /out is a volume; /data is not, so that nothing writable appears there by default
    assert [a for i, a in ins if i == "VOLUME"] == ['["/out"]']
    assert "not been built in CI" in dockerfile.read_text()


def test_compose_scheduler_workers_and_runner() -> None:
    doc = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"scheduler", "worker", "runner"}
    for name, svc in services.items():
        build = svc["build"]
        assert (REPO / "docker" / build["context"] / build["dockerfile"]).resolve() == \
            DOCKERFILES[0], name
        vols = svc["volumes"]
        assert any(v.endswith(":/data:ro") for v in vols) and any(v.endswith(":/out")
                                                                  for v in vols)
    assert services["scheduler"]["entrypoint"] == ["dask", "scheduler"]
    assert "8786" in services["scheduler"]["command"]
    worker = services["worker"]
    assert worker["entrypoint"] == ["dask", "worker"]
    assert worker["command"][0] == "tcp://scheduler:8786"
    assert worker["deploy"]["replicas"] == 2
    runner = services["runner"]
    assert "entrypoint" not in runner  # the image's: wsi-prune
    cmd = runner["command"]
    assert cmd[cmd.index("--scheduler") + 1] == "tcp://scheduler:8786"
    _check_wsi_prune_args(cmd, "compose runner")
    shipped = cmd[cmd.index("--config") + 1]
    assert shipped.startswith("/opt/wsi-prune/")
    assert (REPO / shipped.removeprefix("/opt/wsi-prune/")).is_file()
    # the `dask` command the scheduler and workers run comes with the package's dependencies
    assert shutil.which("dask", path=str(Path(sys.executable).parent))


def _readme_commands() -> list[list[str]]:
    text = (REPO / "docker" / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    joined = " \n".join(blocks).replace("\\\n", " ")
    cmds = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["docker", "run"]:
            image = next(i for i, w in enumerate(words) if w.startswith("wsi-prune:"))
            cmds.append(words[image + 1:])
    return cmds


def test_readme_examples_use_existing_commands_and_options() -> None:
    cmds = _readme_commands()
    assert len(cmds) >= 6
    assert {c[0] for c in cmds} >= {"run", "merge", "doctor"}
    for c in cmds:
        _check_wsi_prune_args(c, f"docker/README.md: {' '.join(c)}")
        for i, word in enumerate(c):
            if word == "--config" and c[i + 1].startswith("/opt/wsi-prune/"):
                assert (REPO / c[i + 1].removeprefix("/opt/wsi-prune/")).is_file()
    text = (REPO / "docker" / "README.md").read_text()
    assert "have not been built or run in CI" in text


@pytest.mark.parametrize("doc", ["README.md", "docs/cluster.md"])
def test_wsi_prune_commands_in_docs_exist(doc: str) -> None:
    """Every `wsi-prune ...` line of the docs' bash blocks names a real command and options."""
    text = (REPO / doc).read_text()
    joined = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).replace("\\\n", " ")
    cmds = [w[1:] for w in (shlex.split(ln, comments=True) for ln in joined.splitlines())
            if w[:1] == ["wsi-prune"]]
    assert len(cmds) >= 8
    for c in cmds:
        _check_wsi_prune_args(c, f"{doc}: wsi-prune {' '.join(c)}")
        for i, word in enumerate(c[:-1]):
            if word == "--config" and c[i + 1].startswith("pipelines/"):
                assert (REPO / c[i + 1]).is_file(), c
