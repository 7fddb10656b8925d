"""Preflight: what a slide is and how much work it will be, without running any model
(:func:`inspect_slide`), and what the machine offers a batch (:func:`environment_report`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from wsi_prune.config import RunConfig
from wsi_prune.io.slide import Slide
from wsi_prune.io.tiling import make_grid, run_tissue_mask

# A rough time estimate, not a benchmark. Measured 2026-12-07 with run_batch (force=True,
# models already built) and pipelines/demo.yaml on the idle 2-core development machine, three
# rounds, on synthetic SVS slides of 2048², 4096², 6144² and 8192² px at 0.5 µm/px (35, 127,
# 203 and 488 tissue tiles): 0.31-0.43, 0.45-0.48, 0.57-0.86 and 0.93-1.00 s per slide. A line
# through the medians gives about 0.3 s per slide plus 0.0013 s per tissue tile (2026-12-01,
# before the cheaper pictures and the TIFF levels read tile by tile: 2.4 s + 0.008 s a tile).
# Larger models (pipelines/camelyon16.yaml's ViT-S) are several times slower per tile; process
# start and model loading (3-7 s a run) come on top.
#: seconds per slide that do not grow with its size (mask, pictures, opening), demo config
SECONDS_PER_SLIDE = 0.3
#: seconds per tissue tile (tiling, triage, pruned ViT on the kept share), demo config
SECONDS_PER_TISSUE_TILE = 0.0013
#: what ``estimated_seconds`` is, for reports
ESTIMATE_NOTE = "rough: demo-config speed on 2 CPU cores, measured 2026-12-07"


def inspect_slide(
    path: str | os.PathLike[str], config: RunConfig, mpp: float | None = None
) -> dict[str, Any]:
    """Metadata, levels, MPP and its source, and the tissue tiles the run would make.

    Returns:
        A flat dict, JSON-serialisable. Raises :class:`~wsi_prune.errors.SlideError` subclasses
        for slides that cannot be used.
    """
    t0 = time.perf_counter()
    with Slide(path, mpp) as slide:
        info = slide.info
        # the mask tiling makes (capped for huge slides), so the estimate counts its tiles
        tm = run_tissue_mask(slide, config)
    grid = make_grid(info, tm.mask, tm.mpp, config.tiling)
    return {
        "path": info.path,
        "reader": info.reader,
        "vendor": info.vendor,
        "size_px": f"{info.width}x{info.height}",
        "mpp": round(info.mpp, 4),
        "mpp_source": info.mpp_source,
        "objective_power": info.objective_power,
        "levels": info.level_count,
        "level_downsamples": [round(d, 3) for d in info.level_downsamples],
        "size_mm": f"{info.width * info.mpp / 1000:.2f}x{info.height * info.mpp / 1000:.2f}",
        "tissue_fraction": round(tm.fraction, 4),
        "grid_tiles": grid.n_rows * grid.n_cols,
        "tissue_tiles": len(grid),
        "tile": f"{config.tiling.tile_px} px @ {config.tiling.mpp} µm/px",
        "inspect_seconds": round(time.perf_counter() - t0, 3),
        "estimated_seconds": round(SECONDS_PER_SLIDE + len(grid) * SECONDS_PER_TISSUE_TILE, 1),
        "estimate_note": ESTIMATE_NOTE,
    }


#: free space in OUT below which ``doctor --env`` reports a problem, bytes
MIN_FREE_BYTES = 10 * 2**30


def environment_report(out: str | os.PathLike[str] = ".") -> dict[str, Any]:
    """What a user checks before a long batch: OpenSlide and libvips versions, torch and its
    accelerators, free disk in ``out``, the Hugging Face cache and offline mode, a writable
    temporary folder.

    Returns:
        A flat JSON-serialisable dict; ``problems`` lists what would stop or slow a batch
        (empty when all is well).
    """
    import openslide
    import torch

    problems: list[str] = []
    rep: dict[str, Any] = {
        "openslide": getattr(openslide, "__library_version__", "unknown"),
        "openslide_python": openslide.__version__,
        "libvips": _libvips_version(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [f"cuda:{i} {torch.cuda.get_device_name(i)}"
                         for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "mps_available": bool(getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()),
    }
    target = Path(out)
    probe = target if target.exists() else next(
        (p for p in target.absolute().parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    rep.update(out=str(target), out_free_gb=round(free / 2**30, 2))
    if free < MIN_FREE_BYTES:
        problems.append(f"only {free / 2**30:.1f} GB free in {probe} (a store is ~10-50 MB per "
                        f"slide, pictures a few MB)")
    hf = _hf_cache()
    rep.update(hf_cache=hf["cache"], hf_offline=hf["offline"])
    tmp = tempfile.gettempdir()
    rep["temp_dir"] = tmp
    try:
        with tempfile.NamedTemporaryFile(dir=tmp, prefix="wsi-prune-doctor-") as fh:
            fh.write(b"x")
        rep["temp_writable"] = True
    except OSError as exc:
        rep["temp_writable"] = False
        problems.append(f"temporary folder {tmp} is not writable ({exc.strerror}); set TMPDIR")
    rep["problems"] = problems
    return rep


def _libvips_version() -> str | None:
    """libvips' version through pyvips or the ``vips`` command, None when neither is here
    (wsi-prune does not need it; tools around it, e.g. TRIDENT's or QuPath's converters,
    may)."""
    try:
        import pyvips

        return ".".join(str(pyvips.version(i)) for i in range(3))
    except Exception:  # noqa: BLE001 - absent, or present without its library
        pass
    exe = shutil.which("vips")
    if exe:
        try:
            res = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
            return res.stdout.strip().removeprefix("vips-") or None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def _hf_cache() -> dict[str, Any]:
    """Hugging Face hub cache folder and offline mode, read at call time (huggingface_hub
    reads its variables once, at import)."""
    from wsi_prune.models.hub import hub_offline

    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")
    return {"cache": cache, "offline": hub_offline()}
