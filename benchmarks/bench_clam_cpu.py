"""CLAM-style dense feature extraction on the CPU, from the slide files: the peer row beside
``wsi-prune run`` and ``wsi-prune run --dense`` on the same slides (issue 12).

What CLAM's ``extract_features_fp.py`` does on a machine without CUDA, re-implemented here
(CLAM is not a package; nothing of it is imported), per slide:

1. **patch coordinates**: wsi-prune's own tissue mask and tile grid (``tissue`` and ``tiling``
   sections of ``--config``), so that the peer embeds exactly the tiles the dense run embeds.
   CLAM's own segmentation and patching step (``create_patches_fp.py``) is *not* run; its
   time is replaced by this one (timed, column ``coords``);
2. **a dataset read one patch at a time**: ``openslide.OpenSlide.read_region`` at the
   pyramid level nearest below the tile MPP, ``.convert("RGB")``, a PIL resize when that
   level is finer than the tile MPP, then torchvision ``ToTensor`` + ``Normalize`` with the
   ViT's mean and std, stacked into batches of ``--batch-size`` (CLAM's default 256). CLAM's
   loader takes ``num_workers=8`` only on CUDA; on the CPU it reads in the main process, as
   here;
3. **the plain timm model** of the config (its weights loaded as ``wsi-prune run`` loads them),
   ``forward_features`` + ``forward_head(pre_logits=True)`` in ``inference_mode``, every patch,
   every token;
4. **features saved** per slide (CLAM appends each batch to an HDF5 file and then writes a
   ``.pt``; here a ``.npy`` of the features and one of the coordinates).

Seconds per slide are wall-clock from opening the slide to the saved features; the total
includes building the model once. No slide prediction or heatmap is made: CLAM's extraction
stops at the features, so a wsi-prune run does more work than this row measures.

    python benchmarks/bench_clam_cpu.py SLIDE_DIR --config CONFIG.yaml --out bench-out/clam-cpu
    python benchmarks/bench_clam_cpu.py SLIDE_DIR --config CONFIG.yaml --limit 4 --json r.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import torch
import yaml
from PIL import Image
from torchvision import transforms

from wsi_prune.config import RunConfig
from wsi_prune.io.slide import SLIDE_EXTENSIONS, open_slide
from wsi_prune.io.tiling import make_grid
from wsi_prune.io.tissue import slide_tissue_mask
from wsi_prune.models.factory import build_models


class SlidePatches(torch.utils.data.Dataset):
    """One slide's tissue patches, read one by one (CLAM's ``Whole_Slide_Bag_FP``)."""

    def __init__(self, path: Path, level0_xy: np.ndarray, level: int, read_px: int,
                 tile_px: int, transform: transforms.Compose) -> None:
        self.osr = openslide.OpenSlide(str(path))
        self.xy, self.level, self.read_px = level0_xy, level, read_px
        self.tile_px, self.transform = tile_px, transform

    def __len__(self) -> int:
        return len(self.xy)

    def __getitem__(self, i: int) -> torch.Tensor:
        x, y = (int(v) for v in self.xy[i])
        img = self.osr.read_region((x, y), self.level, (self.read_px, self.read_px)).convert("RGB")
        if self.read_px != self.tile_px:
            img = img.resize((self.tile_px, self.tile_px), Image.BILINEAR)
        return self.transform(img)


def extract_slide(path: Path, cfg: RunConfig, model: torch.nn.Module,
                  transform: transforms.Compose, batch_size: int, out: Path,
                  mpp: float | None = None) -> dict:
    """CLAM-style features of one slide (``mpp``: its level-0 µm/px when the file has none);
    returns its timings and tile count."""
    t0 = time.perf_counter()
    with open_slide(path, mpp=mpp) as slide:
        info = slide.info
        tm = slide_tissue_mask(slide, cfg.tissue)
        grid = make_grid(info, tm.mask, tm.mpp, cfg.tiling)
        # CLAM reads its patches at one fixed level: the coarsest at or finer than the tiles'
        level = slide.best_level(cfg.tiling.mpp)
    t_coords = time.perf_counter() - t0
    level_mpp = info.mpp * float(info.level_downsamples[level])
    read_px = int(round(cfg.tiling.tile_px * cfg.tiling.mpp / level_mpp))
    data = SlidePatches(path, grid.level0_xy, level, read_px, cfg.tiling.tile_px, transform)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=0)
    feats = []
    t_read = t_model = 0.0
    with torch.inference_mode():
        t = time.perf_counter()
        for batch in loader:
            t1 = time.perf_counter()
            t_read += t1 - t
            emb = model.forward_head(model.forward_features(batch), pre_logits=True)
            feats.append(emb.float().cpu().numpy())
            t = time.perf_counter()
            t_model += t - t1
    data.osr.close()
    features = (np.concatenate(feats) if feats
                else np.zeros((0, int(model.num_features)), np.float32))
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / f"{path.stem}.features.npy", features)
    np.save(out / f"{path.stem}.coords.npy", grid.level0_xy)
    return {"slide": path.name, "tiles": len(grid), "level": level, "read_px": read_px,
            "sec": time.perf_counter() - t0, "sec_coords": t_coords, "sec_read": t_read,
            "sec_model": t_model, "features": list(features.shape)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slides", type=Path, help="a folder of slides (searched one level deep), "
                    "or one slide")
    ap.add_argument("--config", type=Path, required=True,
                    help="a wsi-prune config (YAML): its tissue, tiling and vit sections")
    ap.add_argument("--out", type=Path, default=Path("bench-out/clam-cpu"))
    ap.add_argument("--batch-size", type=int, default=256, help="CLAM's default: 256")
    ap.add_argument("--limit", type=int, default=None, help="the first N slides only")
    ap.add_argument("--mpp", type=float, default=None,
                    help="level-0 µm/px for slides whose files carry none")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = ap.parse_args(argv)

    if args.slides.is_dir():
        slides = sorted(p for p in args.slides.iterdir()
                        if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS)
    else:
        slides = [args.slides]
    slides = slides[:args.limit] if args.limit else slides
    if not slides:
        sys.exit(f"no slide files ({', '.join(SLIDE_EXTENSIONS)}) in {args.slides}")
    cfg = RunConfig.from_dict(yaml.safe_load(args.config.read_text()) or {})

    t0 = time.perf_counter()
    models = build_models(cfg)
    model = models.vit.model.eval()
    transform = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize(models.vit_mean.flatten().tolist(), models.vit_std.flatten().tolist()),
    ])
    t_build = time.perf_counter() - t0
    rows = []
    for i, path in enumerate(slides):
        row = extract_slide(path, cfg, model, transform, args.batch_size, args.out, args.mpp)
        rows.append(row)
        print(f"[{i + 1}/{len(slides)}] {row['slide']}: {row['tiles']} tiles in {row['sec']:.2f} s "
              f"(coords {row['sec_coords']:.2f}, read {row['sec_read']:.2f}, "
              f"model {row['sec_model']:.2f})", flush=True)
    wall = time.perf_counter() - t0
    tiles = sum(r["tiles"] for r in rows)
    secs = np.array([r["sec"] for r in rows])
    res = {
        "slides": len(rows), "tiles": tiles, "wall_s": wall, "build_s": t_build,
        "sec_per_slide_mean": float(secs.mean()), "sec_per_slide_median": float(np.median(secs)),
        "sec_per_slide_range": [float(secs.min()), float(secs.max())],
        "tiles_per_s": tiles / float(secs.sum()) if secs.sum() else 0.0,
        "sec_read_total": sum(r["sec_read"] for r in rows),
        "sec_model_total": sum(r["sec_model"] for r in rows),
        "sec_coords_total": sum(r["sec_coords"] for r in rows),
        "batch_size": args.batch_size, "vit": cfg.vit.model,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "rows": rows,
    }
    print(f"CLAM-style: {len(rows)} slides, {tiles} tiles, {wall:.1f} s wall "
          f"({res['sec_per_slide_mean']:.2f} s/slide, {res['tiles_per_s']:.1f} tiles/s; read "
          f"{res['sec_read_total']:.1f} s, model {res['sec_model_total']:.1f} s, coords "
          f"{res['sec_coords_total']:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
