"""The container files, checked without a container engine (tests/test_containers.py builds and
runs them where podman works): every file a Dockerfile copies exists, its pins are the
Makefile's, its entry point is our console script, every `wsi-prune` command and option that the
Docker docs, compose file and sbatch template use exists in the CLI, and docker/build.sh keys
its image cache on what goes into the image and nothing else."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
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
SBATCH = REPO / "docker" / "wsi-prune-image.sbatch"
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
    copies = [args for ins, args in _instructions(dockerfile)
              if ins in ("COPY", "ADD") and not args.startswith("--from")]
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
    assert len(pip) == 3, pip
    # 1. torch and torchvision first, with exactly the Makefile's pins, from TORCH_INDEX_URL
    assert dict(PIN.findall(pip[0])) == _makefile_pins()
    assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in pip[0]
    # 2. then the dependencies, read from pyproject.toml (the reqs stage writes the list)
    assert "-r /tmp/requirements.txt" in pip[1]
    assert any("tomllib" in r and "['project']['dependencies']" in r for r in runs)
    # 3. then the package itself: not editable, no dependencies, no dev extras in an image
    assert pip[2].split()[-1] == "." and "--no-deps" in pip[2] and "-e" not in pip[2].split()
    assert '-e ".[dev]"' in _makefile_package_install()
    # and the Makefile's pins are the package's own
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, version in _makefile_pins().items():
        assert f"{name}=={version}" in deps


def test_cpu_and_gpu_images_differ_only_in_torch_wheels() -> None:
    """The same stages and steps; the GPU file differs in torch's index and the NVIDIA_*
    variables the NVIDIA container toolkit reads."""
    cpu, gpu = (_instructions(p) for p in DOCKERFILES)
    assert len(cpu) == len(gpu)
    diff = [(a, b) for a, b in zip(cpu, gpu, strict=True) if a != b]
    assert [(a[0], b[0]) for a, b in diff] == [("ARG", "ARG"), ("ENV", "ENV")], diff
    (_, cpu_arg), (_, gpu_arg) = diff[0]
    assert cpu_arg == "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    assert gpu_arg == "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128"
    (_, cpu_env), (_, gpu_env) = diff[1]
    assert gpu_env == cpu_env + " NVIDIA_VISIBLE_DEVICES=all " \
        "NVIDIA_DRIVER_CAPABILITIES=compute,utility"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_stages_entrypoint_user_and_mounts(dockerfile: Path) -> None:
    ins = _instructions(dockerfile)
    # a public default base for users; the local one comes in with --build-arg BASE
    assert ins[0] == ("ARG", "BASE=python:3.11-slim")
    froms = [a for i, a in ins if i == "FROM"]
    assert froms == ["${BASE} AS python", "python AS reqs", "python AS deps", "deps AS app",
                     "deps AS runtime"]
    entry = [a for i, a in ins if i == "ENTRYPOINT"]
    assert entry == ['["wsi-prune"]']
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["wsi-prune"].partition(":")
    assert isinstance(getattr(__import__(module, fromlist=[func]), func), click.Group)
    # the runtime stage: a non-root user, the package copied from the app stage, no healthcheck
    runtime = ins[[i for i, (w, a) in enumerate(ins) if w == "FROM"][-1]:]
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    run_text = " ".join(a for i, a in runtime if i == "RUN")
    assert "useradd" in run_text and "mkdir -p /data /models /out" in run_text
    assert ("COPY", "--from=app /opt/app /opt/venv") in runtime
    assert not any(i == "HEALTHCHECK" for i, _ in ins)
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "PATH=/opt/venv/bin:$PATH" in env
    # /out is a volume; /data and /models are not, so that nothing writable appears there
    assert [a for i, a in ins if i == "VOLUME"] == ['["/out"]']
    # apt leaves no lists behind, and the only compilers-free install route is wheels
    apt = [a for i, a in ins if i == "RUN" and "apt-get install" in a]
    assert all("rm -rf /var/lib/apt/lists/*" in a and "apt-get clean" in a for a in apt)
    assert not re.search(r"\b(gcc|g\+\+|build-essential|make)\b", run_text)


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
    # the measured size and build times are recorded, with the machine they were measured on
    text = (REPO / "docker" / "README.md").read_text()
    assert re.search(r"\| image size[^|]*\| [0-9.]+ GB", text), "docker/README.md: the size"
    assert re.search(r"\| cold build[^|]*\| [0-9.]+ min", text), "docker/README.md: the time"


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


# -- docker/build.sh: what the image cache is keyed on --------------------------------------------
def _hashes(tree: Path, flavour: str = "cpu", **env: str) -> tuple[str, str]:
    """(image hash, deps-stage hash) that docker/build.sh computes for ``tree``. With
    WSI_ENGINE=false no engine answers, so the base is the Dockerfile's default."""
    proc = subprocess.run(["bash", str(tree / "docker" / "build.sh"), "--hash", flavour],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WSI_ENGINE": "false", **env})
    assert proc.returncode == 0, proc.stderr
    image, deps = proc.stdout.split()
    return image, deps


def test_build_hash_follows_what_goes_into_the_image(tmp_path: Path) -> None:
    """The image tag changes with any source, the Dockerfile or the build args, and not with
    __pycache__; the deps-stage tag (what makes a build quick) changes only with the stages up
    to deps and the dependency list, not with the sources, comments or pyproject's tool
    settings."""
    tree = tmp_path / "repo"
    for name in ("docker", "wsi_prune", "pipelines"):
        shutil.copytree(REPO / name, tree / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in (".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    image0, deps0 = _hashes(tree)
    assert len(image0) == len(deps0) == 16 and _hashes(tree) == (image0, deps0)

    (tree / "wsi_prune" / "__pycache__").mkdir(exist_ok=True)
    (tree / "wsi_prune" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert _hashes(tree) == (image0, deps0)

    init = tree / "wsi_prune" / "__init__.py"
    init.write_text(init.read_text() + "\n# edited\n")
    image1, deps1 = _hashes(tree)
    assert image1 != image0 and deps1 == deps0

    dockerfile = tree / "docker" / "Dockerfile"
    text = dockerfile.read_text()
    dockerfile.write_text(text.replace("# torch and torchvision first", "# torch first", 1))
    image2, deps2 = _hashes(tree)
    assert image2 != image1 and deps2 == deps0  # a comment in the deps stage

    pyproject = tree / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(text.replace("line-length = 100", "line-length = 99"))
    image3, deps3 = _hashes(tree)
    assert image3 != image2 and deps3 == deps0  # a tool setting
    pyproject.write_text(text.replace('"tqdm>=4.66",', '"tqdm>=4.66",\n    "rich>=13",'))
    assert _hashes(tree)[1] != deps0  # a new dependency

    assert _hashes(tree, TORCH_INDEX_URL="")[1] != _hashes(tree)[1]
    assert _hashes(tree, "gpu")[1] != _hashes(tree)[1]


@pytest.mark.parametrize(("target", "flavour"), [("image", "cpu"), ("image-gpu", "gpu")])
def test_make_image_targets_call_the_build_script(target: str, flavour: str) -> None:
    if shutil.which("make") is None:
        pytest.skip("no make")
    # under `make test` MAKELEVEL/MAKEFLAGS are set and a nested make prints "Entering directory"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=REPO,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["docker/build.sh", flavour]


# -- the sbatch template --------------------------------------------------------------------------
def test_sbatch_template_directives_and_commands() -> None:
    """#SBATCH lines before the first command (sbatch stops reading them there), valid bash,
    and every `wsi-prune` command and option it passes exists."""
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, ln in enumerate(lines)
                         if ln.strip() and not ln.lstrip().startswith("#"))
    directives = [i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")]
    assert directives and max(directives) < first_command
    text = SBATCH.read_text()
    run_opts = {opt for ln in lines if re.match(r"\s*(\[\[.*&& )?args\+?=\(", ln)
                for opt in re.findall(r"(?<![\w-])--[a-z][a-z-]*", ln)}
    assert run_opts >= {"--out", "--quiet", "--shard", "--config"}
    _check_wsi_prune_args(["run", "/data", *sorted(run_opts)], "wsi-prune-image.sbatch")
    assert "args=(merge /out)" in text
    _check_wsi_prune_args(["merge", "/out"], "wsi-prune-image.sbatch")


def _sbatch_script(env: dict[str, str]) -> subprocess.CompletedProcess:
    keep = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    return subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, timeout=30,
                          env={**keep, **env})


def test_sbatch_template_refuses_bad_setups_with_a_reason(tmp_path: Path) -> None:
    """Run as plain bash (what the batch job does before the container starts): a missing
    variable, an array that is not 0..K-1, an unknown engine each stop with a reason."""
    proc = _sbatch_script({"WSI_SLIDES": str(tmp_path), "WSI_OUT": str(tmp_path)})
    assert proc.returncode != 0 and "WSI_IMAGE" in proc.stderr
    env = {"WSI_IMAGE": "wsi-prune:cpu", "WSI_SLIDES": str(tmp_path), "WSI_OUT": str(tmp_path),
           "WSI_ENGINE": "podman", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_MAX": "4", "SLURM_ARRAY_TASK_COUNT": "4"}
    proc = _sbatch_script(env)
    assert proc.returncode == 2 and "--array must be 0-(K-1), got 1-4" in proc.stderr
    proc = _sbatch_script({**env, "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "3",
                           "WSI_ENGINE": "lxc"})
    assert proc.returncode == 2 and "WSI_ENGINE=lxc" in proc.stderr
