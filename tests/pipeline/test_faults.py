"""Faults with real processes and real files, each asserting that nothing is lost: runs
SIGKILLed inside tiling, the ViT stage and publishing, then resumed; a disk that fills up mid
run; a read-only OUT; an unreadable slide; a slide replaced while it is processed; symlink
loops and a folder of 2 000 bad files; configuration errors that stop a run before its first
slide. The long versions (20 kill points, 200-slide soak) are slow-marked here and in
``benchmarks/bench_faults.py``; figures in docs/reliability.md."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from tests._faults import (
    CLI,
    DEMO_YAML,
    KillPoint,
    complete_ids,
    differences,
    leftovers,
    plan,
    read_csv,
    run_episode,
    same_array,
    stamps,
    start_run,
    write_bad_files,
)
from wsi_prune.cli import main
from wsi_prune.errors import EXIT_ERROR, EXIT_SOME_FAILED


@pytest.fixture(scope="module")
def six(tmp_path_factory) -> Path:
    """Six small synthetic slides (1024² px, 0.5 µm/px, three with tumour)."""
    from wsi_prune.synth import write_dataset

    if not CLI.is_file():
        pytest.skip(f"console script not installed at {CLI}")
    d = tmp_path_factory.mktemp("six")
    write_dataset(d, n=6, seed=3, size=1024)
    return d


@pytest.fixture(scope="module")
def four(six, tmp_path_factory) -> Path:
    """The first four of them: the quick tests' batch (each CLI run costs its imports)."""
    d = tmp_path_factory.mktemp("four")
    for i in range(4):
        shutil.copy(six / f"synth_{i:03d}.svs", d)
    return d


def _reference(slides: Path, out: Path, env: dict[str, str] | None = None) -> list[str]:
    proc = start_run([slides], out, env=env)
    rc = proc.wait(timeout=900)
    assert rc == 0, proc.communicate()
    return [r["id"] for r in read_csv(out / "predictions.csv")]


@pytest.fixture(scope="module")
def reference(four, tmp_path_factory) -> tuple[Path, list[str]]:
    """An undisturbed run over the four slides: what every disturbed run must end up with."""
    out = tmp_path_factory.mktemp("ref") / "out"
    return out, _reference(four, out)


# -- kill anywhere ---------------------------------------------------------------------------
def test_sigkill_inside_tiling_vit_and_publishing_then_resume(four, reference, tmp_path):
    """Three runs SIGKILLed (process group) while slide 1 writes its tiles, slide 2 is in the
    ViT stage and slide 3 writes its pictures, each resuming the last; the fourth run finishes:
    every array of every store, the probabilities and the text outputs equal the undisturbed
    run's, slides complete before a kill were never recomputed, nothing is left behind.

    The runs tile ahead (``--tile-ahead``, pipeline/ahead.py): slide 1 is tiled under slide
    0's ViT stage, so the first kill finds slide 0 unfinished too and the second run starts
    from no complete slide. The reference run tiles as the machine's default says; the
    results are the same either way."""
    ref, ids = reference
    points = [KillPoint("tiling", 1), KillPoint("vit", 2), KillPoint("publish", 3)]
    res = run_episode(four, tmp_path / "out", ref, ids, points, extra=("--tile-ahead",))
    assert [p.reached for p in res.points] == [True] * 3, res.points
    assert [p.done_before for p in res.points] == [0, 0, 2], res.points
    assert res.points[0].state.startswith(f"{ids[0]}: ViT"), res.points[0]
    assert res.ok, res.problems


@pytest.mark.slow
def test_sigkill_at_20_seeded_points_including_a_dask_worker(six, tmp_path):
    """20 seeded kill points (random moments, tiling, ViT, publishing, a Dask worker) over six
    slides, in episodes of up to 4; each episode ends with a run to completion equal to an
    undisturbed run (one with OMP_NUM_THREADS=1 for episodes with Dask workers: same float
    results)."""
    ref = tmp_path / "ref"
    ids = _reference(six, ref)
    ref1 = tmp_path / "ref-1thread"
    assert _reference(six, ref1, {"OMP_NUM_THREADS": "1"}) == ids
    tried = survived = 0
    for k, points in enumerate(plan(seed=14, n_points=20, n_slides=len(ids), max_time_s=25)):
        workers = any(p.stage == "worker" for p in points)
        res = run_episode(six, tmp_path / f"ep{k}", ref1 if workers else ref, ids, points,
                          env={"OMP_NUM_THREADS": "1"} if workers else None)
        tried += len(points)
        survived += len(points) if res.ok else 0
        assert res.ok, (points, res.problems)
    assert (tried, survived) == (20, 20)


# -- disk full ---------------------------------------------------------------------------------
def _mount_tmpfs(where: Path, size: str, readonly: bool = False) -> None:
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        reason = f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})"
        print(reason)
        pytest.skip(reason)


@pytest.fixture
def tmpfs(tmp_path):
    mounted: list[Path] = []

    def make(name: str, size: str, readonly: bool = False) -> Path:
        where = tmp_path / name
        _mount_tmpfs(where, size, readonly)
        mounted.append(where)
        return where

    yield make
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(where: Path, leave_bytes: int) -> Path:
    ballast = where / "ballast.bin"
    free = shutil.disk_usage(where).free - leave_bytes
    with open(ballast, "wb") as fh:
        while free > 0:
            n = min(free, 1 << 20)
            fh.write(b"\0" * n)
            free -= n
    return ballast


@pytest.mark.parametrize("ahead", ["--tile-ahead", "--no-tile-ahead"])
def test_disk_full_mid_run_fails_the_slide_then_a_rerun_completes(four, reference, tmpfs,
                                                                  ahead):
    """OUT on a 64 MiB tmpfs; once a slide is done the run is paused, the disk filled to
    64 KiB and the run resumed: the slides that hit ENOSPC are failed as ``disk-full`` with a
    one-line reason, nothing half-written is published, the finished slides stay intact; after
    the ballast is removed, a re-run completes with outputs equal to an undisturbed run."""
    ref, ids = reference
    out = tmpfs("full", "64m") / "out"
    proc = start_run([four], out, ahead)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        pred = out / "predictions.csv"
        if pred.is_file() and any(r["status"] == "ok" for r in read_csv(pred)):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the disk could be filled"
    os.killpg(proc.pid, signal.SIGSTOP)
    ballast = _fill(out.parent, 64 * 1024)
    done = complete_ids(out)
    frozen = stamps(out, done)
    os.killpg(proc.pid, signal.SIGCONT)
    rc = proc.wait(timeout=600)
    err = proc.communicate()[1]
    assert rc == EXIT_SOME_FAILED, err
    rows = {r["id"]: r for r in read_csv(out / "predictions.csv")}
    assert sorted(rows) == ids
    failed = {sid: r["error"] for sid, r in rows.items() if r["status"] == "failed"}
    assert failed and all(e.startswith("disk-full: ") and "no space left" in e and
                          str(out) in e for e in failed.values()), failed
    ok = {sid for sid, r in rows.items() if r["status"] == "ok"}
    assert done <= ok and ok == complete_ids(out)
    assert not differences(out, ref, sorted(ok))
    for sid in failed:  # nothing of a failed slide looks finished
        assert not (out / sid).exists()
        # what it wrote after its tiling is deleted: the room goes back to the table
        assert not any((out / f"{sid}.zarr" / g).exists() for g in ("triage", "vit", "mil"))
        meta = out / f"{sid}.zarr" / "zarr.json"
        if meta.is_file():
            assert "run_hash" not in json.loads(meta.read_text())["attributes"]
    assert not leftovers(out), leftovers(out)

    ballast.unlink()
    again = start_run([four], out)
    assert again.wait(timeout=600) == 0, again.communicate()
    rows = {r["id"]: r["status"] for r in read_csv(out / "predictions.csv")}
    assert {sid for sid, st in rows.items() if st == "skipped"} == ok
    assert stamps(out, done) == frozen  # not recomputed
    assert not differences(out, ref, ids)
    assert not leftovers(out)


def test_disk_too_small_for_the_first_slide_stops_before_it(six, tmpfs):
    out = tmpfs("tiny", "1m") / "out"
    res = CliRunner().invoke(main, ["run", str(six), "--out", str(out), "--config", DEMO_YAML,
                                    "--quiet"])
    assert res.exit_code == EXIT_ERROR, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "MiB free" in line and "synth_000.svs" in line
    assert not list(out.glob("*.zarr")) and not (out / "predictions.csv").exists()


# -- read-only OUT, unreadable slide ---------------------------------------------------------
def test_read_only_out_is_one_line_and_touches_nothing(four, reference, tmpfs):
    """A fresh OUT on a read-only filesystem, and a finished run's OUT remounted read-only:
    exit 1 with one line naming OUT, and not a byte changed."""
    ref, _ = reference
    ro = tmpfs("ro", "1m", readonly=True)
    res = CliRunner().invoke(main, ["run", str(four), "--out", str(ro / "out"), "--config",
                                    DEMO_YAML, "--quiet"])
    assert res.exit_code == EXIT_ERROR, res.output
    line = res.stderr.strip()
    assert "\n" not in line and "Read-only file system" in line and str(ro / "out") in line

    done = tmpfs("done", "64m")
    shutil.copytree(ref, done / "out")
    before = {p: p.stat().st_mtime_ns for p in (done / "out").rglob("*")}
    r = subprocess.run(["mount", "-o", "remount,ro", str(done)], capture_output=True)
    assert r.returncode == 0, r.stderr
    res = CliRunner().invoke(main, ["run", str(four), "--out", str(done / "out"), "--config",
                                    DEMO_YAML, "--quiet"])
    assert res.exit_code == EXIT_ERROR and "Read-only file system" in res.stderr
    assert {p: p.stat().st_mtime_ns for p in (done / "out").rglob("*")} == before


def test_unreadable_slide_fails_alone(six, tmp_path):
    """A slide without read permission fails with a one-line reason, the others finish. The
    run is made as an unprivileged user (root reads any file whatever its mode)."""
    import stat

    base = Path(tempfile.mkdtemp(prefix="wsi-prune-perm-", dir="/tmp"))
    try:
        slides = base / "slides"
        slides.mkdir()
        for name in ("synth_000.svs", "synth_001.svs"):
            shutil.copy(six / name, slides / name)
        locked = slides / "synth_001.svs"
        locked.chmod(0)
        for p in (base, slides, slides / "synth_000.svs"):
            p.chmod(p.stat().st_mode | stat.S_IRWXO if p.is_dir() else 0o644)
        (base / "out").mkdir(mode=0o777)
        (base / "out").chmod(0o777)
        cmd = [str(CLI), "run", str(slides), "--out", str(base / "out"), "--config", DEMO_YAML,
               "--quiet"]
        env = {**os.environ, "HOME": str(base / "out"), "MPLCONFIGDIR": str(base / "out")}
        if os.geteuid() == 0:
            drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            probe = subprocess.run([*drop, "cat", str(locked)], capture_output=True)
            if shutil.which("setpriv") is None or probe.returncode == 0:
                reason = "running as root and cannot drop to an unprivileged user: root " \
                         "reads a file whatever its mode, so this fault cannot be made here"
                print(reason)
                pytest.skip(reason)
            # a checkout inside a 0700 folder (mktemp -d) hides the venv from that user
            runs = subprocess.run([*drop, str(CLI), "--help"], capture_output=True, env=env)
            if runs.returncode != 0:
                reason = (f"the unprivileged user cannot run {CLI} (the checkout or its venv "
                          "is not readable by others), so this fault cannot be made here")
                print(reason)
                pytest.skip(reason)
            cmd = drop + cmd
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == EXIT_SOME_FAILED, proc.stderr
        rows = {r["id"]: r for r in read_csv(base / "out" / "predictions.csv")}
        assert rows["synth_000"]["status"] == "ok"
        assert rows["synth_001"]["status"] == "failed"
        assert rows["synth_001"]["error"] == (f"unsupported: {locked}: cannot read the file "
                                              "(Permission denied)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- a slide replaced while the run goes -------------------------------------------------------
def test_slide_replaced_mid_slide_is_refused_not_mixed(six, tmp_path):
    """In process, deterministic: the slide file is replaced during triage (a progress
    callback): the slide fails as ``slide-changed`` before the ViT reads the new file, its
    outputs are not marked complete, and the next run processes the new file."""
    from wsi_prune.errors import SlideChanged
    from wsi_prune.pipeline.demo import demo_config
    from wsi_prune.pipeline.inputs import SlideEntry
    from wsi_prune.pipeline.process import process_slide, run_complete

    slide = tmp_path / "s.svs"
    shutil.copy(six / "synth_000.svs", slide)
    entry, out, cfg = SlideEntry("s", slide), tmp_path / "out", demo_config()
    out.mkdir()

    def replace_once(stage: str, done: int, total: int) -> None:
        if stage == "triage" and not replaced:
            replaced.append(True)
            shutil.copy(six / "synth_001.svs", tmp_path / "new.svs")
            os.replace(tmp_path / "new.svs", slide)

    replaced: list[bool] = []
    from wsi_prune.models.factory import build_models

    models = build_models(cfg)
    with pytest.raises(SlideChanged, match="replaced or modified during tiling and triage"):
        process_slide(entry, out, cfg, models, progress=replace_once)
    assert replaced and not run_complete(out, entry, cfg) and not (out / "s").exists()
    row = process_slide(entry, out, cfg, models)
    assert row["status"] == "ok" and run_complete(out, entry, cfg)
    g = zarr.open_group(str(out / "s.zarr"), mode="r")
    assert g.attrs["slide_file"]["size_bytes"] == (six / "synth_001.svs").stat().st_size


@pytest.mark.parametrize("ahead", ["--tile-ahead", "--no-tile-ahead"])
def test_slide_replaced_while_a_run_goes(four, reference, tmp_path, ahead):
    """A real run paused while it works on slide 2, the slide replaced by another slide's
    file, the run resumed: whatever slide 2's row says, an ``ok`` is the new file's outputs
    and a failure is ``slide-changed``; after a re-run, slide 2 holds the new file's outputs
    and the others equal the undisturbed run."""
    ref, ids = reference
    slides = tmp_path / "slides"
    shutil.copytree(four, slides)
    out = tmp_path / "out"
    proc = start_run([slides], out, ahead)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / f"{ids[2]}.lock").exists():
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before slide 2"
    os.killpg(proc.pid, signal.SIGSTOP)
    shutil.copy(four / "synth_003.svs", slides / "new.tmp")
    os.replace(slides / "new.tmp", slides / "synth_002.svs")
    os.killpg(proc.pid, signal.SIGCONT)
    rc = proc.wait(timeout=600)
    proc.communicate()
    rows = {r["id"]: r for r in read_csv(out / "predictions.csv")}
    row = rows[ids[2]]
    print(f"slide 2 after its file was replaced: {row['status']} {row['error']}")
    assert rc in (0, EXIT_SOME_FAILED)
    if row["status"] == "failed":
        assert row["error"].startswith("slide-changed: "), row["error"]
    else:
        assert not _arrays_differ(out, ids[2], ref, ids[3])
    assert not differences(out, ref, [i for i in ids if i != ids[2]])
    again = start_run([slides], out)
    assert again.wait(timeout=600) == 0, again.communicate()
    assert not _arrays_differ(out, ids[2], ref, ids[3])
    assert not leftovers(out)


def _arrays_differ(out: Path, sid: str, ref: Path, ref_sid: str) -> list[str]:
    """Arrays of ``sid`` that differ from those of ``ref_sid`` (the same pixels under another
    id: the text outputs and attributes name the slide, the arrays do not)."""
    import numpy as np

    a = zarr.open_group(str(out / f"{sid}.zarr"), mode="r")
    b = zarr.open_group(str(ref / f"{ref_sid}.zarr"), mode="r")
    names = [n for n, x in b.members(max_depth=None) if isinstance(x, zarr.Array)]
    return [n for n in names if not same_array(np.asarray(a[n][...]), np.asarray(b[n][...]))]


# -- bad inputs --------------------------------------------------------------------------------
def test_folder_of_2000_bad_files_and_symlink_loops(tmp_path, six):
    """2 000 empty, garbage, random and truncated-TIFF files, symlink loops and a broken link
    next to one good slide: exit 3, one row per file, every bad one failed with a one-line
    reason naming it, the good one ok. (Time: about 14 s on 2 shared cores, docs/reliability.md;
    the timeout is a hang guard, not a benchmark.)"""
    d = tmp_path / "bad"
    d.mkdir()
    write_bad_files(d, 2000)
    (d / "sub").mkdir()
    (d / "sub" / "up").symlink_to("..")
    (d / "loop.svs").symlink_to("loop.svs")
    (d / "gone.svs").symlink_to("nowhere.svs")
    shutil.copy(six / "synth_000.svs", d / "good.svs")
    out = tmp_path / "out"
    proc = subprocess.run([str(CLI), "run", str(d), "--out", str(out), "--config", DEMO_YAML,
                           "--quiet"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == EXIT_SOME_FAILED, proc.stderr[-2000:]
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == 2003 and len({r["id"] for r in rows}) == 2003
    by_id = {r["id"]: r for r in rows}
    assert by_id["good"]["status"] == "ok"
    assert by_id["loop"]["error"].endswith("symlink loop (the link leads back to itself)")
    assert "broken symlink" in by_id["gone"]["error"]
    kinds = {}
    for r in rows:
        if r["id"] == "good":
            continue
        assert r["status"] == "failed" and r["path"] in r["error"] and "\n" not in r["error"]
        kinds[r["error"].split(":", 1)[0]] = kinds.get(r["error"].split(":", 1)[0], 0) + 1
    assert kinds == {"unsupported": 1602, "corrupt": 400}, kinds
    assert not leftovers(out)


def test_configuration_errors_stop_before_the_first_slide(six, tmp_path):
    """What would fail every slide alike stops the run at once: exit 1, one line, no slide
    touched (it used to be one ``failed`` row per slide and exit 3)."""
    import yaml

    base = yaml.safe_load(Path(DEMO_YAML).read_text())
    (tmp_path / "mil.json").write_text(json.dumps({"kind": "wsi-prune-mil"}))
    (tmp_path / "mil.safetensors").write_bytes(b"")
    cases = {
        "missing weights": ({"scorer": {"weights": str(tmp_path / "nope.safetensors")}},
                            "weights file not found"),
        "unknown ViT": ({"vit": {"model": "vit_nonexistent_patch16"}}, "unknown timm model"),
        "sidecar of another kind": ({"scorer": {"weights": str(tmp_path / "mil.safetensors")}},
                                    "expected 'wsi-prune-scorer'"),
    }
    for name, (change, message) in cases.items():
        cfg = {k: {**v, **change.get(k, {})} for k, v in base.items()}
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = tmp_path / f"out-{path.stem}"
        res = CliRunner().invoke(main, ["run", str(six), "--out", str(out), "--config",
                                        str(path), "--quiet"])
        assert res.exit_code == EXIT_ERROR, (name, res.output)
        lines = [x for x in res.stderr.strip().splitlines() if x.startswith("error: ")]
        assert len(lines) == 1 and message in lines[0], (name, res.stderr)
        assert not list(out.glob("*.zarr")) and not (out / "predictions.csv").exists(), name
        assert not leftovers(out), name
