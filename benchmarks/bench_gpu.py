"""Dense vs pruned seconds per slide on a GPU, for foundation-model-sized ViTs with random
weights, and the same slides through a CLAM-style dense loop.

For each synthetic 0.25 µm/px slide (about ``--tiles`` tissue tiles of 224 px at 0.5 µm/px;
see ``benchmarks/_gpu_slides.py`` for how they are made and why they are rendered rather than
written as SVS at full size) and each model shape:

* ``ViT-L/16``: UNI's architecture (``hf-hub:MahmoodLab/UNI`` in the known-models table:
  ``vit_large_patch16_224``, LayerScale), 61.6 GMACs per tile dense;
* ``ViT-H/14``: UNI2-h's architecture (``vit_giant_patch14_224`` at 1536 wide, 24 blocks, 8
  registers, SwiGLU packed, SiLU, built from the table's config strings), 185.5 GMACs per tile;

three paths are timed, tiles already in host memory (uint8), models already on the device:

* ``pruned``: what ``wsi-prune run`` does after tiling: the CNN scorer on every coarse tile
  (``scorer.precision``), tile selection (policy ``fraction``: the top ``--tile-fraction`` of
  the tissue tiles, a fixed budget because a random-weight scorer's nucleus means nothing), the
  CNN token prior (ratio ``--token-ratio``), then the pruned ViT (ratio ``--vit-keep`` at three
  blocks), each batch through :meth:`Models.vit_input` (pinned, non-blocking copies);
* ``dense``: ``wsi-prune run --dense``: the scorer, then every tile and token through the same
  wrapper;
* ``CLAM-style``: every tissue tile through the plain timm model (``forward_features`` +
  ``forward_head``), batch by batch, in the same precision with the same pinned copies: the
  peer's ``extract_features_fp`` loop with the reading already done.

Printed per row: seconds per slide, tiles/s, patch tokens entering the ViT (share of all), GMACs
(ViT + scorer, :mod:`wsi_prune.selection.macs`), mean GPU utilisation while the row ran
(``torch.cuda.utilization`` or ``nvidia-smi``), peak GPU memory. Then dense/pruned and
CLAM/pruned speed-ups and the share of the MAC ratio's promise that the pruned ViT reached.
Random weights: token and tile selections are arbitrary, so only speed is measured, never
accuracy. Each path is warmed up on one batch first (CUDA context, cuBLAS/cuDNN plans).

    scripts/gpu-bench.sh                                  # one H200, under 5 minutes
    python benchmarks/bench_gpu.py --device cuda --precision bf16 --slides 1 --tiles 20000
    python benchmarks/bench_gpu.py --tiny                 # CPU smoke run, tiny models, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gpu_slides import TILING, SlideTiles, make_slides  # noqa: E402

from wsi_prune.config import RunConfig, TileSelectConfig, TokenSelectConfig  # noqa: E402
from wsi_prune.models.accel import autocast  # noqa: E402
from wsi_prune.models.factory import Models, build_models  # noqa: E402
from wsi_prune.models.hub import known_model  # noqa: E402
from wsi_prune.models.scorer import score_tiles  # noqa: E402
from wsi_prune.selection.macs import vit_batch_macs, vit_macs  # noqa: E402
from wsi_prune.selection.tiles import select_tiles  # noqa: E402
from wsi_prune.selection.tokens import select_patches  # noqa: E402

#: name -> (label, hub name whose known architecture is used, pruning blocks)
MODELS = {
    "uni": ("ViT-L/16 (UNI shape)", "hf-hub:MahmoodLab/UNI", (6, 12, 18)),
    "uni2h": ("ViT-H/14 (UNI2-h shape)", "hf-hub:MahmoodLab/UNI2-h", (6, 12, 18)),
}
TINY_SHRINK = dict(depth=4, embed_dim=48, num_heads=2)  # img_size stays 224


@dataclass
class Row:
    slide: str
    model: str
    path: str
    seconds: float
    tiles: int
    tissue_tiles: int
    tokens_in: int
    tokens_all: int
    gmacs: float
    gpu_util: float | None = None
    peak_gib: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else float("nan")


class GpuUtil:
    """Mean GPU utilisation (%) while a block runs: ``torch.cuda.utilization`` (needs pynvml)
    polled every 0.1 s, else a streaming ``nvidia-smi -lms 100``; None on CPU or without
    either."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def _physical_index(self) -> str:
        index = self.device.index or 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        return visible[index].strip() if len(visible) > index and visible[index].strip() \
            else str(index)

    def __enter__(self) -> GpuUtil:
        if self.device.type != "cuda":
            return self
        try:
            torch.cuda.utilization(self.device)
            self._thread = threading.Thread(target=self._poll, daemon=True)
        except Exception:  # noqa: BLE001 - no pynvml: try nvidia-smi
            try:
                self._proc = subprocess.Popen(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                     "-i", self._physical_index(), "-lms", "100"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                self._thread = threading.Thread(target=self._read, daemon=True)
            except OSError:
                return self
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(float(torch.cuda.utilization(self.device)))

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=2)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def run_config(key: str, args: argparse.Namespace) -> RunConfig:
    label, hub, blocks = MODELS[key]
    known = known_model(hub)
    kwargs = dict(known.model_args)
    if args.tiny:
        kwargs.update(TINY_SHRINK)
        blocks = (1, 2)
    return RunConfig().replace(
        tiling=TILING,
        scorer={"batch_size": 256 if not args.tiny else 16, "precision": args.precision},
        tile_select=TileSelectConfig(policy="fraction", fraction=args.tile_fraction,
                                     min_tiles=1, max_tiles=None),
        token_select=TokenSelectConfig(policy="ratio", keep_ratio=args.token_ratio),
        vit={"model": known.architecture, "model_kwargs": kwargs, "prune_blocks": blocks,
             "prune_policy": "ratio", "keep_ratio": args.vit_keep, "batch_size": args.batch,
             "precision": args.precision, "mean": known.pretrained_cfg["mean"],
             "std": known.pretrained_cfg["std"], "pooling": known.pooling},
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def triage(models: Models, cfg: RunConfig, slide: SlideTiles) -> tuple[np.ndarray, np.ndarray]:
    out = score_tiles(models.scorer, slide.coarse, cfg.scorer.batch_size,
                      precision=cfg.scorer.precision)
    patch, tile, emb = out.numpy()
    kept = select_tiles(tile, cfg.tile_select, slide.grid_rc, emb)
    return np.flatnonzero(kept), patch


def wsi_prune_path(models: Models, cfg: RunConfig, slide: SlideTiles, limit: int | None = None
                   ) -> tuple[int, int, int]:
    """The pipeline's model stages on in-memory tiles; returns (tiles, tokens in, ViT MACs)."""
    idx, patch = triage(models, cfg, slide)
    if limit is not None:
        idx = idx[:limit]
    spec, bs = models.macs["spec"], cfg.vit.batch_size
    tokens = macs = 0
    with torch.inference_mode():
        for s in range(0, len(idx), bs):
            b = idx[s:s + bs]
            x = models.vit_input(slide.full[b])
            keep0 = select_patches(torch.from_numpy(patch[b]), cfg.token_select,
                                   grid=models.grid)
            res = models.vit(x, keep0)
            res.embedding.cpu()  # the pipeline stores every batch's embeddings
            tokens += int(res.kept[0].sum())
            macs += vit_batch_macs(spec, res.tokens_per_image,
                                   cls_attn_blocks=res.cls_attn_blocks,
                                   patches_embedded=res.patches_embedded).vit
    return len(idx), tokens, macs


def clam_path(models: Models, cfg: RunConfig, slide: SlideTiles, limit: int | None = None
              ) -> int:
    """Every tissue tile through the plain timm model, batch by batch (CLAM's
    extract_features_fp loop after reading): returns the tiles embedded."""
    model, bs = models.vit.model, cfg.vit.batch_size
    n = len(slide) if limit is None else min(limit, len(slide))
    with torch.inference_mode():
        for s in range(0, n, bs):
            x = models.vit_input(slide.full[s:min(s + bs, n)])
            with autocast(x.device, cfg.vit.precision):
                emb = model.forward_head(model.forward_features(x), pre_logits=True)
            emb.float().cpu()
    return n


def measure(key: str, args: argparse.Namespace, slides: list[SlideTiles], device: torch.device,
            deadline: float, notes: list[str]) -> list[Row]:
    label = MODELS[key][0] + (" tiny" if args.tiny else "")
    cfg = run_config(key, args)
    t0 = time.perf_counter()
    pruned_models = build_models(cfg, str(device))
    dense_cfg = cfg.dense()
    dense_models = Models(**{**pruned_models.__dict__,
                             "vit": type(pruned_models.vit)(pruned_models.vit.model,
                                                            dense_cfg.vit).eval()})
    spec = pruned_models.macs["spec"]
    scorer_macs = pruned_models.macs["scorer_per_tile"]
    print(f"\n{label}: {sum(p.numel() for p in pruned_models.vit.parameters()) / 1e6:.0f} M "
          f"params, {vit_macs(spec) / 1e9:.1f} GMACs/tile dense, built on {device} in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    # warm-up: CUDA context, cuBLAS/cuDNN plans, allocator pools
    wsi_prune_path(pruned_models, cfg, slides[0], limit=cfg.vit.batch_size)
    wsi_prune_path(dense_models, dense_cfg, slides[0], limit=cfg.vit.batch_size)
    clam_path(pruned_models, cfg, slides[0], limit=cfg.vit.batch_size)
    sync(device)
    rows = []
    p_all = spec.n_patches
    for slide in slides:
        n = len(slide)
        for path in ("pruned", "dense", "CLAM-style"):
            if time.perf_counter() > deadline:
                notes.append(f"skipped {label} {path} on {slide.name}: time budget spent")
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with GpuUtil(device) as util:
                t = time.perf_counter()
                if path == "CLAM-style":
                    tiles, tokens, macs = clam_path(pruned_models, cfg, slide), n * p_all, \
                        n * vit_macs(spec)
                    scorer = 0
                else:
                    m, c = (pruned_models, cfg) if path == "pruned" else (dense_models, dense_cfg)
                    tiles, tokens, macs = wsi_prune_path(m, c, slide)
                    scorer = n * scorer_macs
                sync(device)
                seconds = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated(device) / 2**30 \
                if device.type == "cuda" else None
            row = Row(slide.name, label, path, seconds, tiles, n, tokens, n * p_all,
                      (macs + scorer) / 1e9, util.mean, peak,
                      {"vit_gmacs": macs / 1e9, "scorer_gmacs": scorer / 1e9})
            rows.append(row)
            print(fmt_row(row), flush=True)
    del pruned_models, dense_models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


HEADER = (f"{'slide':<8} {'model':<28} {'path':<10} {'s/slide':>8} {'tiles':>6} "
          f"{'tiles/s':>8} {'tokens in':>14} {'GMACs':>10} {'GPU %':>6} {'peak GiB':>8}")


def fmt_row(r: Row) -> str:
    util = "n/a" if r.gpu_util is None else f"{r.gpu_util:.0f}"
    peak = "n/a" if r.peak_gib is None else f"{r.peak_gib:.1f}"
    share = 100 * r.tokens_in / max(1, r.tokens_all)
    return (f"{r.slide:<8} {r.model:<28} {r.path:<10} {r.seconds:8.2f} {r.tiles:6d} "
            f"{r.tiles_per_s:8.1f} {r.tokens_in:8d} {share:4.1f}% {r.gmacs:10.1f} "
            f"{util:>6} {peak:>8}")


def summary(rows: list[Row]) -> list[str]:
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        by = {p: [r for r in rows if r.model == model and r.path == p]
              for p in ("pruned", "dense", "CLAM-style")}
        if not by["pruned"]:
            continue
        pruned = float(np.mean([r.seconds for r in by["pruned"]]))
        line = f"{model}: pruned {pruned:.2f} s/slide"
        for p in ("dense", "CLAM-style"):
            if by[p]:
                other = float(np.mean([r.seconds for r in by[p]]))
                line += f"; {p} {other:.2f} s ({other / pruned:.1f}x the pruned time)"
        if by["dense"]:
            vit_ratio = np.mean([r.extra["vit_gmacs"] for r in by["dense"]]) / \
                max(1e-9, np.mean([r.extra["vit_gmacs"] for r in by["pruned"]]))
            speed = np.mean([r.seconds for r in by["dense"]]) / pruned
            line += (f"; dense/pruned ViT GMACs {vit_ratio:.1f}x, so the speed-up is "
                     f"{100 * speed / vit_ratio:.0f} % of what the MACs promise (scorer and "
                     "copies included)")
        out.append(line)
    return out


def environment(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}",
             f"{os.cpu_count()} CPU cores"]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        parts.insert(0, f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    else:
        parts.insert(0, f"{device.type}: {platform.processor() or platform.machine()}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: cuda "
                    "when available)")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                    help="autocast of ViT and scorer (default: bf16 on CUDA, fp32 elsewhere)")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["uni", "uni2h"])
    ap.add_argument("--slides", type=int, default=1)
    ap.add_argument("--tiles", type=int, default=20_000, help="tissue tiles per slide (about)")
    ap.add_argument("--source", choices=("render", "svs"), default=None,
                    help="render tiles directly (default) or write and read an SVS (--tiny)")
    ap.add_argument("--batch", type=int, default=None, help="ViT batch (default 256; tiny 8)")
    ap.add_argument("--tile-fraction", type=float, default=0.1)
    ap.add_argument("--token-ratio", type=float, default=0.5)
    ap.add_argument("--vit-keep", type=float, default=0.7)
    ap.add_argument("--budget-s", type=float, default=270.0,
                    help="start no new row after this many seconds (the H200 run has 300)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/wsi-prune-bench-gpu"))
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny models (4 blocks, 48 wide) and one small SVS: a CPU smoke run")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if args.tiny:
        args.tiles = min(args.tiles, 12)
        args.source = args.source or "svs"
        args.batch = args.batch or 8
        args.tile_fraction = max(args.tile_fraction, 0.5)
    args.source = args.source or "render"
    args.batch = args.batch or 256
    deadline = start + args.budget_s
    # tiles first: the render processes fork before this process touches CUDA
    slides = make_slides(args.slides, args.tiles, args.source, args.work)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    print(f"bench_gpu: {environment(device)}; precision {args.precision}, ViT batch "
          f"{args.batch}", flush=True)
    for s in slides:
        print(f"{s.name}: {s.width}x{s.height} px at 0.25 µm/px, {len(s)} tissue tiles "
              f"({s.source}: {s.seconds:.1f} s to make and load)", flush=True)
    notes: list[str] = []
    print(HEADER)
    rows: list[Row] = []
    for key in args.models:
        if time.perf_counter() > deadline:
            notes.append(f"skipped {MODELS[key][0]}: time budget spent")
            continue
        rows += measure(key, args, slides, device, deadline, notes)
    print()
    for line in summary(rows) + notes:
        print(line)
    total = time.perf_counter() - start
    print(f"total {total:.0f} s")
    result = {"environment": environment(device), "precision": args.precision,
              "source": args.source, "total_s": total, "notes": notes,
              "slides": [{"name": s.name, "tissue_tiles": len(s), "width": s.width,
                          "height": s.height, "make_s": s.seconds} for s in slides],
              "rows": [{**r.__dict__, "tiles_per_s": r.tiles_per_s} for r in rows]}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
