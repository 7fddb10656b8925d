"""The docker/ images really built and run, with podman (or docker): the CPU image on the real
slide and on synthetic slides (`run --rm --network none`, read-only input, a read-only root file
system), its exit codes, who owns its outputs, what it carries; the compose file (a Dask
scheduler, two workers and a runner); the sbatch template on a real single-node SLURM.

These tests need a container engine and an image, so they are marked ``container`` and run only
with ``--containers``: `.ci/run` adds it when podman works and the image, or at least its deps
stage (torch and the dependencies, most of the build time), is already on the machine
(``docker/build.sh --cached``). Without an engine they skip with the reason. The ``image``
fixture builds with ``docker/build.sh``, once per session; the build is skipped when an image of
the same sources (hash of the Dockerfile, build args, base image, package sources) exists.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._paths import REPO, SHARED_DATA, SHARED_SLIDE

pytestmark = pytest.mark.container

BUILD = REPO / "docker" / "build.sh"
COMPOSE = REPO / "docker" / "compose.yaml"
SBATCH = REPO / "docker" / "wsi-prune-image.sbatch"
DEMO_CONFIG = "/opt/wsi-prune/pipelines/demo.yaml"
RUN_TIMEOUT_S = 900


# -- engine, image, user -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def engine() -> str:
    """podman (or docker) that can start a container, else skip with the reason."""
    exe = shutil.which("podman") or shutil.which("docker")
    if exe is None:
        pytest.skip("no podman or docker: container tests skip (.ci/run installs podman with "
                    "../shared/containers/setup.sh where it can)")
    info = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120)
    if info.returncode != 0:
        pytest.skip(f"{exe} info failed: {(info.stderr or info.stdout).strip()[:300]}")
    return exe


@pytest.fixture(scope="session")
def image(engine: str) -> str:
    """The CPU image of these sources, built by docker/build.sh unless it exists already."""
    env = {**os.environ, "WSI_ENGINE": Path(engine).name}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(BUILD), "cpu"], capture_output=True, text=True, env=env,
                          timeout=3600)
    assert proc.returncode == 0, f"docker/build.sh failed:\n{proc.stderr[-4000:]}"
    tag = proc.stdout.strip().splitlines()[-1]
    print(f"\nimage {tag} ready in {time.monotonic() - t0:.0f} s")
    return tag


@pytest.fixture(scope="session")
def rootless(engine: str) -> bool:
    if Path(engine).name != "podman":
        return False
    out = subprocess.run([engine, "info", "--format", "{{.Host.Security.Rootless}}"],
                         capture_output=True, text=True).stdout
    return out.strip() == "true"


@pytest.fixture(scope="session")
def run_as() -> tuple[int, int]:
    """The (uid, gid) the outputs must belong to: the invoking user's. Under root, an
    unprivileged stand-in (4321): root would own anything, and the image's own user is 1000, so
    either mistake would pass a check against root."""
    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    return 4321, 4321


def _user_flags(run_as: tuple[int, int], rootless: bool) -> list[str]:
    """The documented mapping (docker/README.md): --user UID:GID, plus keep-id rootless."""
    flags = ["--user", f"{run_as[0]}:{run_as[1]}"]
    return flags + (["--userns", "keep-id"] if rootless else [])


def _out_dir(path: Path, run_as: tuple[int, int]) -> Path:
    """An output folder owned by ``run_as``, as a user's own folder would be."""
    path.mkdir(parents=True)
    if os.getuid() == 0:
        os.chown(path, *run_as)
    return path


# -- helpers -------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under ``folder``: (size, mtime ns, sha256 of the content; '' for folders)."""
    snap = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        snap[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, digest)
    return snap


def _foreign_owners(folder: Path, run_as: tuple[int, int]) -> list[str]:
    """Paths under ``folder`` not owned by ``run_as`` (uid, gid)."""
    return [f"{p.relative_to(folder)}: {p.lstat().st_uid}:{p.lstat().st_gid}"
            for p in folder.rglob("*") if (p.lstat().st_uid, p.lstat().st_gid) != run_as]


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def _podman_run(engine: str, image: str, args: list[str], *, mounts: list[str],
                user: list[str], extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [engine, "run", "--rm", "--network", "none", *user, *extra]
    for m in mounts:
        cmd += ["-v", m]
    return subprocess.run([*cmd, image, *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)


@pytest.fixture(scope="session")
def synth_slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 2048² synthetic SVS slides (one with tumour), as `wsi-prune synth` writes them."""
    from wsi_prune.synth import write_dataset

    folder = tmp_path_factory.mktemp("container-slides")
    # mktemp makes it 0700: the container's user could not list it, and `wsi-prune run` on an
    # unreadable folder is an error ("folder cannot be listed")
    folder.chmod(0o755)
    write_dataset(folder, n=2, size=2048, seed=7)
    return folder


@pytest.fixture(scope="session")
def single_container_probs() -> dict[str, float]:
    """synth_000's probability from the single-container run, for the compose and SLURM runs
    to compare with: the same image on the same slide must give the same number."""
    return {}


# -- the image itself ----------------------------------------------------------------------------
_FACTS = r"""
import json, os, shutil, importlib.metadata as md
import torch, wsi_prune
wheels = []
for root, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/dev")]
    wheels += [os.path.join(root, f) for f in files if f.endswith((".whl", ".tar.gz"))]
def mb(*paths):
    return sum(os.path.getsize(os.path.join(r, f)) for p in paths for r, _, fs in os.walk(p)
               for f in fs if not os.path.islink(os.path.join(r, f))) / 1e6
site = os.path.dirname(os.path.dirname(torch.__file__))
torch_cuda = [os.path.join(site, d) for d in os.listdir(site)
              if d.split("-")[0].split("_")[0] in ("torch", "torchvision", "nvidia", "triton",
                                                    "cuda")]
print(json.dumps({
    "uid": os.getuid(), "home": os.path.expanduser("~"),
    "compilers": [c for c in ("gcc", "cc", "c++", "g++", "clang", "make", "ld") if shutil.which(c)],
    "pip_caches": [p for p in ("/root/.cache/pip", "/home/wsi/.cache/pip") if os.path.exists(p)],
    "apt_lists": [f for f in os.listdir("/var/lib/apt/lists") if f not in ("lock", "partial")],
    "wheels": wheels,
    "sources": [p for p in ("/src", "/tests", "/opt/app", "/opt/wsi-prune/wsi_prune",
                            "/tmp/pyproject.toml", "/tmp/requirements.txt") if os.path.exists(p)],
    "opt": sorted(os.listdir("/opt/wsi-prune")),
    "package": wsi_prune.__file__, "version": md.version("wsi-prune"),
    "torch": torch.__version__,
    "mb_torch_cuda": mb(*torch_cuda),
    "mb_other_site": mb(site) - mb(*torch_cuda),
    "mb_outside_venv": mb("/usr", "/etc", "/var", "/home", "/root"),
    "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_HOME", "TORCH_HOME")},
}))
"""


def test_image_carries_the_package_and_nothing_else(engine: str, image: str) -> None:
    """Entry point, non-root user, offline hub, mount points; no compilers, caches, wheels,
    sources or tests in the image; and the size of everything but torch stays small."""
    cfg = json.loads(subprocess.run([engine, "image", "inspect", image], capture_output=True,
                                    text=True, check=True).stdout)[0]["Config"]
    assert cfg["Entrypoint"] == ["wsi-prune"]
    assert cfg["User"] == "wsi"
    assert "Healthcheck" not in cfg or not cfg["Healthcheck"]
    assert list(cfg.get("Volumes") or {}) == ["/out"]

    facts_proc = subprocess.run([engine, "run", "--rm", "--network", "none", "--entrypoint",
                                 "python3", image, "-c", _FACTS],
                                capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert facts_proc.returncode == 0, facts_proc.stderr[-3000:]
    facts = json.loads(facts_proc.stdout)
    print(json.dumps({k: v for k, v in facts.items() if k.startswith("mb_")}))
    assert facts["uid"] == 1000 and facts["home"] == "/home/wsi"
    assert facts["compilers"] == [] and facts["pip_caches"] == [] and facts["apt_lists"] == []
    assert facts["wheels"] == [] and facts["sources"] == []
    assert facts["opt"] == ["pipelines"]
    assert facts["package"].startswith("/opt/venv/lib/python3")
    assert facts["package"].endswith("/site-packages/wsi_prune/__init__.py")
    assert facts["env"] == {"HF_HUB_OFFLINE": "1", "HF_HOME": "/models/huggingface",
                            "TORCH_HOME": "/models/torch"}
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert facts["version"] == version
    assert facts["torch"].startswith("2.14.1")
    # Measured 2026-12-01 (torch 2.14.1+cu130 from PyPI): the dependencies but torch/CUDA take
    # ~0.55 GB and the base + python3 ~0.2 GB; a cache or a compiler toolchain would show here.
    assert facts["mb_other_site"] < 900, facts
    assert facts["mb_outside_venv"] < 400, facts

    version_proc = subprocess.run([engine, "run", "--rm", "--network", "none", image,
                                   "--version"], capture_output=True, text=True, timeout=300)
    assert version_proc.returncode == 0 and version in version_proc.stdout
    usage = subprocess.run([engine, "run", "--rm", "--network", "none", image, "run",
                            "--no-such-option"], capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2, usage.stderr  # click's usage error, through the container


# -- batch runs ---------------------------------------------------------------------------------
def test_synthetic_slide_exit_0(engine: str, image: str, run_as: tuple[int, int],
                                rootless: bool, synth_slides: Path, tmp_path: Path,
                                single_container_probs: dict[str, float]) -> None:
    """A demo slide, mounted read-only: exit 0, an `ok` row, outputs owned by the user,
    nothing written to the input mount."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy2(synth_slides / "synth_000.svs", slides)
    out = _out_dir(tmp_path / "out", run_as)
    before = _snapshot(slides)
    proc = _podman_run(engine, image, ["run", "/data", "--out", "/out", "--config", DEMO_CONFIG,
                                       "--quiet"],
                       mounts=[f"{slides}:/data:ro", f"{out}:/out"],
                       user=_user_flags(run_as, rootless))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _snapshot(slides) == before
    rows = _rows(out / "predictions.csv")
    assert list(rows) == ["synth_000"] and rows["synth_000"]["status"] == "ok"
    assert rows["synth_000"]["path"] == "/data/synth_000.svs"
    assert int(rows["synth_000"]["tissue_tiles"]) > 0
    assert (out / "synth_000" / "heatmap.png").stat().st_size > 0
    assert json.loads((out / "manifest.json").read_text())["versions"]["torch"].startswith(
        "2.14.1")
    assert _foreign_owners(out, run_as) == []
    single_container_probs["synth_000"] = float(rows["synth_000"]["probability"])


def test_real_slide_and_a_bad_file_exit_3(engine: str, image: str, run_as: tuple[int, int],
                                          rootless: bool, tmp_path: Path) -> None:
    """The real H&E slide (../shared/data mounted read-only) and a corrupt `.svs` in a second
    read-only mount, in a container whose root file system is read-only too (as under
    Apptainer): exit 3, the real slide `ok` at its 0.499 µm/px, the bad file `failed` with a
    reason naming it, nothing written to either input."""
    if not SHARED_SLIDE.is_file():
        pytest.skip(f"real slide not present at {SHARED_SLIDE}")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 4096)  # a TIFF header, no IFD
    out = _out_dir(tmp_path / "out", run_as)
    before = _snapshot(SHARED_DATA), _snapshot(bad)
    proc = _podman_run(engine, image, ["run", "/data", "/bad", "--out", "/out", "--config",
                                       DEMO_CONFIG, "--quiet"],
                       mounts=[f"{SHARED_DATA}:/data:ro", f"{bad}:/bad:ro", f"{out}:/out"],
                       user=_user_flags(run_as, rootless), extra=("--read-only",))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert (_snapshot(SHARED_DATA), _snapshot(bad)) == before
    rows = _rows(out / "predictions.csv")
    assert sorted(rows) == ["broken", SHARED_SLIDE.stem]
    real = rows[SHARED_SLIDE.stem]
    assert real["status"] == "ok" and real["path"] == f"/data/{SHARED_SLIDE.name}"
    assert abs(float(real["mpp"]) - 0.499) < 1e-3 and real["mpp_source"] == "openslide"
    assert int(real["tissue_tiles"]) > 0 and 0.0 <= float(real["probability"]) <= 1.0
    assert (out / SHARED_SLIDE.stem / "heatmap.png").stat().st_size > 0
    assert rows["broken"]["status"] == "failed"
    assert "broken.svs" in rows["broken"]["error"] + proc.stderr, rows["broken"]
    assert _foreign_owners(out, run_as) == []


# -- compose: scheduler + 2 workers + runner -----------------------------------------------------
def _compose_cmd(engine: str) -> list[str] | None:
    name = Path(engine).name
    if subprocess.run([engine, "compose", "version"], capture_output=True).returncode == 0:
        return [engine, "compose"]
    candidates = ["podman-compose"] if name == "podman" else ["docker-compose"]
    for c in candidates:
        exe = shutil.which(c) or shutil.which(c, path=str(Path(sys.executable).parent))
        if exe:
            return [exe]
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _project_containers(engine: str, project: str, service: str | None = None) -> list[str]:
    filters = ["--filter", f"label=com.docker.compose.project={project}"]
    if service:
        filters += ["--filter", f"label=com.docker.compose.service={service}"]
    return subprocess.run([engine, "ps", "-a", "--format", "{{.Names}}", *filters],
                          capture_output=True, text=True, timeout=60).stdout.split()


@pytest.fixture
def compose_project(engine: str, image: str, synth_slides: Path, run_as: tuple[int, int],
                    tmp_path: Path) -> Iterator[tuple[list[str], str, dict[str, str], Path]]:
    """(compose command with project and file, project, environment, output folder); brought
    down after, and checked to leave no container and no network behind."""
    compose = _compose_cmd(engine)
    if compose is None:
        pytest.skip(f"no `{Path(engine).name} compose` and no podman-compose/docker-compose")
    slides = tmp_path / "slides"
    slides.mkdir()
    for p in synth_slides.glob("synth_*.svs"):
        shutil.copy2(p, slides)
    out = _out_dir(tmp_path / "out", run_as)
    project = f"wsiprunetest{os.getpid()}"
    env = {**os.environ, "WSI_IMAGE": image, "WSI_SLIDES": str(slides), "WSI_OUT": str(out),
           "WSI_UID": str(run_as[0]), "WSI_GID": str(run_as[1]),
           "WSI_DASHBOARD_PORT": str(_free_port()), "WSI_WORKER_MEMORY": "3GB"}
    cmd = [*compose, "-p", project, "-f", str(COMPOSE)]
    try:
        yield cmd, project, env, out
    finally:
        down = subprocess.run([*cmd, "down", "-t", "5"], capture_output=True, text=True,
                              env=env, timeout=300)
        networks = subprocess.run([engine, "network", "ls", "--format", "{{.Name}}"],
                                  capture_output=True, text=True).stdout.split()
        left = _project_containers(engine, project)
        assert down.returncode == 0 and left == [], (down.stderr[-2000:], left)
        assert not [n for n in networks if n.startswith(project)], networks


def test_compose_scheduler_two_workers_and_runner(
        engine: str, compose_project: tuple[list[str], str, dict[str, str], Path],
        single_container_probs: dict[str, float]) -> None:
    """`up -d scheduler worker`, then `run --rm runner`: the run completes through the Dask
    scheduler with two workers; the slides are processed on the workers (they load the models,
    the runner does not) and give the single container's numbers."""
    cmd, project, env, out = compose_project
    up = subprocess.run([*cmd, "up", "-d", "scheduler", "worker"], capture_output=True,
                        text=True, env=env, timeout=600)
    assert up.returncode == 0, up.stderr[-3000:]
    workers = _project_containers(engine, project, "worker")
    assert len(workers) == 2, workers  # deploy.replicas
    run = subprocess.run([*cmd, "run", "--rm", "runner"], capture_output=True, text=True,
                         env=env, timeout=RUN_TIMEOUT_S)
    runner_log = run.stdout + run.stderr

    def logs(name: str) -> str:
        proc = subprocess.run([engine, "logs", name], capture_output=True, text=True,
                              timeout=120)
        return proc.stdout + proc.stderr

    scheduler = _project_containers(engine, project, "scheduler")
    scheduler_log = logs(scheduler[0])
    assert run.returncode == 0, (runner_log[-3000:], scheduler_log[-3000:])
    assert "connected to Dask scheduler tcp://scheduler:8786 (2 workers" in runner_log
    rows = _rows(out / "predictions.csv")
    assert sorted(rows) == ["synth_000", "synth_001"]
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert rows["synth_000"]["path"] == "/data/synth_000.svs"
    assert scheduler_log.count("Register worker") >= 2, scheduler_log[-3000:]
    # untrained demo models warn when they load: on a worker, never in the runner
    loaded = [w for w in workers if "has no trained weights" in logs(w)]
    print(f"models loaded on {loaded}")
    assert loaded and "has no trained weights" not in runner_log
    assert _foreign_owners(out, run_as=(int(env["WSI_UID"]), int(env["WSI_GID"]))) == []
    if "synth_000" in single_container_probs:
        assert float(rows["synth_000"]["probability"]) == pytest.approx(
            single_container_probs["synth_000"], abs=1e-5)


# -- SLURM: the sbatch template runs the image ---------------------------------------------------
def _sinfo_partition() -> str | None:
    if shutil.which("sinfo") is None:
        return None
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                              timeout=10)
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout.split()[0].rstrip("*") if proc.returncode == 0 and proc.stdout else None


@pytest.mark.slurm
def test_sbatch_template_runs_the_image_in_an_array_then_merges(
        engine: str, image: str, synth_slides: Path, run_as: tuple[int, int], tmp_path: Path,
        single_container_probs: dict[str, float]) -> None:
    """docker/wsi-prune-image.sbatch as its header says: an array of 2 shards, each running the
    image on one slide, then the merge job; outputs belong to WSI_USER."""
    partition = _sinfo_partition()
    if partition is None:
        pytest.skip("no responding SLURM (.ci/run starts one with scripts/start-slurm.sh)")
    out = _out_dir(tmp_path / "out", run_as)
    logs = tmp_path / "logs"  # SLURM writes these as the submitter, so not under OUT here
    logs.mkdir()
    env = {**os.environ, "WSI_IMAGE": image, "WSI_SLIDES": str(synth_slides),
           "WSI_OUT": str(out), "WSI_ENGINE": Path(engine).name,
           "WSI_CONFIG": DEMO_CONFIG, "WSI_USER": f"{run_as[0]}:{run_as[1]}"}
    common = ["--parsable", "-p", partition, "--cpus-per-task=1", "--mem=2G",
              "--time=00:15:00"]
    array = subprocess.run(["sbatch", *common, "--array=0-1", f"--output={logs}/%A_%a.out",
                            str(SBATCH)], capture_output=True, text=True, env=env, timeout=60)
    assert array.returncode == 0, array.stderr
    array_id = array.stdout.strip().split(";")[0]
    merge = subprocess.run(["sbatch", *common, f"--dependency=afterany:{array_id}",
                            f"--output={logs}/merge_%j.out", str(SBATCH)],
                           capture_output=True, text=True, env={**env, "WSI_MERGE": "1"},
                           timeout=60)
    assert merge.returncode == 0, merge.stderr
    merge_id = merge.stdout.strip().split(";")[0]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", f"{array_id},{merge_id}"],
                           capture_output=True, text=True)
        if q.returncode == 0 and not q.stdout.strip():
            break
        time.sleep(2)
    else:
        subprocess.run(["scancel", array_id, merge_id], check=False)
        pytest.fail(f"SLURM jobs {array_id}, {merge_id} still queued after {RUN_TIMEOUT_S} s")

    def job_log() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.iterdir()))

    assert (out / "predictions.csv").is_file(), job_log()
    for i in range(2):
        assert (out / f"predictions.shard-{i}-of-2.csv").is_file(), job_log()
        assert f"--shard {i}/2" in (logs / f"{array_id}_{i}.out").read_text()
    assert "merge /out" in (logs / f"merge_{merge_id}.out").read_text()
    rows = _rows(out / "predictions.csv")
    assert sorted(rows) == ["synth_000", "synth_001"], job_log()
    assert {r["status"] for r in rows.values()} == {"ok"}, job_log()
    assert _foreign_owners(out, run_as) == [], job_log()
    if "synth_000" in single_container_probs:
        assert float(rows["synth_000"]["probability"]) == pytest.approx(
            single_container_probs["synth_000"], abs=1e-5)
