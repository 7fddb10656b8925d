"""User-facing command-line behaviour: the group's -v/-q reach ``run``, device names, an
explicit MPP through the CLI and slide lists, ``doctor --env``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import openslide
import pytest
import torch
from click.testing import CliRunner

from wsi_prune._devices import parse_device
from wsi_prune.cli import main
from wsi_prune.errors import ConfigError
from wsi_prune.pipeline.inputs import discover


@pytest.fixture()
def not_a_slide(tmp_path: Path) -> Path:
    p = tmp_path / "notes.svs"
    p.write_text("this is not a slide\n")
    return p


# -- logging -------------------------------------------------------------------------------------


def test_group_verbosity_reaches_run(not_a_slide: Path, tmp_path: Path):
    """``wsi-prune -vv run``: debug output (the failed slide's traceback) on stderr and in
    run.log; ``run`` used to reset the level to INFO."""
    out = tmp_path / "out-vv"
    res = CliRunner().invoke(main, ["-vv", "run", str(not_a_slide), "--out", str(out)])
    assert res.exit_code == 3, res.output
    assert "DEBUG wsi_prune.pipeline.batch" in res.stderr and "Traceback" in res.stderr
    assert "Traceback" in (out / "run.log").read_text()
    # default: INFO and up, no debug
    out = tmp_path / "out-default"
    res = CliRunner().invoke(main, ["run", str(not_a_slide), "--out", str(out)])
    assert "INFO wsi_prune" in res.stderr and "DEBUG" not in res.stderr
    assert "Traceback" not in (out / "run.log").read_text()
    # -q: warnings only on stderr; the log file still has INFO
    out = tmp_path / "out-q"
    res = CliRunner().invoke(main, ["-q", "run", str(not_a_slide), "--out", str(out)])
    assert "INFO" not in res.stderr and "WARNING wsi_prune.pipeline.batch" in res.stderr
    assert "INFO" in (out / "run.log").read_text()


def test_tifffile_messages_go_to_the_log_file_and_to_stderr_only_with_vv(tmp_path: Path,
                                                                         capsys):
    """tifffile logs odd tags of a damaged file bare (a page offset, no file name) on stderr
    beside the slide's own error; a run keeps them in run.log, and shows them with -vv."""
    import logging

    import tifffile

    from wsi_prune.cli.common import setup_logging

    lib = logging.getLogger("tifffile")
    saved = lib.handlers[:], lib.propagate
    log = tmp_path / "run.log"
    try:
        setup_logging(0, False, log)
        tifffile.logger().error("<tifffile.TiffPage 2 @1850194> incorrect StripOffsets count")
        assert "StripOffsets" not in capsys.readouterr().err
        assert "ERROR tifffile: <tifffile.TiffPage 2 @1850194>" in log.read_text()
        setup_logging(0, True, None)  # no log file: nowhere, not Python's bare last resort
        tifffile.logger().error("an odd tag")
        assert "odd tag" not in capsys.readouterr().err
        setup_logging(2, False, None)
        tifffile.logger().error("an odd tag")
        assert "ERROR tifffile: an odd tag" in capsys.readouterr().err
    finally:
        setup_logging(0, False, None)
        lib.handlers[:], lib.propagate = saved


# -- devices -------------------------------------------------------------------------------------


def test_device_names_are_parsed_strictly():
    assert parse_device("cpu") == "cpu"
    assert parse_device(" CUDA:1 ") == "cuda:1"
    assert parse_device("cuda") == "cuda" and parse_device("mps") == "mps"
    for bad in ("gpu", "cuda:", "cuda:01", "cuda:-1", "cuda:x", "mps:0", ""):
        with pytest.raises(ConfigError, match="cuda:N"):
            parse_device(bad)


def test_run_accepts_cuda_n_and_mps_and_checks_they_exist(not_a_slide: Path, tmp_path: Path):
    r = CliRunner()
    res = r.invoke(main, ["run", str(not_a_slide), "--out", str(tmp_path / "a"),
                          "--device", "gpu"])
    assert res.exit_code == 2 and "cuda:N" in res.stderr  # a usage error, like any bad option
    res = r.invoke(main, ["run", str(not_a_slide), "--out", str(tmp_path / "b"),
                          "--device", "cuda:7"])
    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    # accepted by the parser (the old Choice refused it with exit 2), refused by the check
    assert res.exit_code == 1, res.output
    assert "cuda:7" in res.stderr and ("not available" in res.stderr
                                       or "CUDA device(s)" in res.stderr)
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        res = r.invoke(main, ["run", str(not_a_slide), "--out", str(tmp_path / "c"),
                              "--device", "mps"])
        assert res.exit_code == 1 and "MPS is not available" in res.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_on_cuda_0_agrees_with_cpu(svs_nompp_slide: Path, tmp_path: Path):
    from wsi_prune.pipeline.batch import run_batch
    from wsi_prune.pipeline.demo import demo_config

    cpu = run_batch([svs_nompp_slide], tmp_path / "cpu", demo_config(), progress=False)[0]
    gpu = run_batch([svs_nompp_slide], tmp_path / "gpu", demo_config(), device="cuda:0",
                    progress=False)[0]
    assert cpu["status"] == gpu["status"] == "ok", (cpu["error"], gpu["error"])
    assert gpu["kept_tiles"] == cpu["kept_tiles"]
    assert gpu["probability"] == pytest.approx(cpu["probability"], abs=1e-3)


# -- MPP -----------------------------------------------------------------------------------------


def test_info_uses_the_given_mpp_over_the_objective_power(svs_nompp_slide: Path):
    res = CliRunner().invoke(main, ["info", str(svs_nompp_slide), "--mpp", "0.263", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert (info["mpp"], info["mpp_source"]) == (0.263, "user")
    assert info["objective_power"] == 20
    help_text = CliRunner().invoke(main, ["run", "--help"]).output
    assert "Wins over the slide's metadata" in " ".join(help_text.split())


def test_slide_list_mpp_column_wins_over_the_option(tmp_path: Path, svs_slide: Path):
    lst = tmp_path / "slides.csv"
    lst.write_text(f"path,id,mpp\n{svs_slide},a,0.26\n{svs_slide},b,\n")
    a, b = discover([lst], mpp=0.3)
    assert (a.id, a.mpp) == ("a", 0.26) and (b.id, b.mpp) == ("b", 0.3)


# -- doctor --env --------------------------------------------------------------------------------


def _env(tmp_path: Path, *extra: str) -> tuple[int, dict]:
    res = CliRunner().invoke(main, ["doctor", "--env", "--json", "--out", str(tmp_path),
                                    *extra])
    return res.exit_code, json.loads(res.stdout.splitlines()[0])["env"]


def test_doctor_env_reports_the_machine(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    code, env = _env(tmp_path)
    assert env["openslide"] == openslide.__library_version__
    assert env["openslide_python"] == openslide.__version__
    assert env["torch"] == torch.__version__
    assert env["cuda_available"] is torch.cuda.is_available()
    assert len(env["cuda_devices"]) == (torch.cuda.device_count()
                                        if torch.cuda.is_available() else 0)
    assert isinstance(env["mps_available"], bool)
    assert env["libvips"] is None or env["libvips"][0].isdigit()
    assert env["out_free_gb"] > 0 and env["temp_writable"] is True
    assert env["hf_cache"] == str(tmp_path / "hf" / "hub") and env["hf_offline"] is False
    assert code == (3 if env["problems"] else 0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _env(tmp_path)[1]["hf_offline"] is True
    # text form
    res = CliRunner().invoke(main, ["doctor", "--env", "--out", str(tmp_path)])
    assert "openslide:" in res.output and "temp_writable:" in res.output


def test_doctor_env_finds_an_unwritable_temp_folder(tmp_path: Path, monkeypatch):
    missing = tmp_path / "no-such-tmp"
    monkeypatch.setattr(tempfile, "tempdir", str(missing))
    code, env = _env(tmp_path)
    assert env["temp_writable"] is False and code == 3
    assert any(str(missing) in p and "TMPDIR" in p for p in env["problems"])


def test_doctor_needs_slides_or_env():
    res = CliRunner().invoke(main, ["doctor"])
    assert res.exit_code == 2 and "--env" in res.stderr
