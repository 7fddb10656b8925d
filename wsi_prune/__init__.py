"""wsi-prune: whole-slide images to slide predictions and heatmaps, fast.

Slide → tissue mask → Dask-written Zarr tile store → cheap CNN triage → token-pruned ViT →
attention-MIL slide prediction and heatmaps. See the README for the data flow.
"""

__version__ = "0.1.0"
