"""A slide's output folder ``OUT/<id>/`` (:mod:`wsi_prune.outputs.writer` writes it).

Imports nothing: slide discovery (:mod:`wsi_prune.pipeline.inputs`) knows a run's pictures by
these names, so that it never takes them for slides, without loading the writers.
"""

#: the pictures of ``OUT/<id>/``, always written
PICTURES = ("heatmap.png", "tokens.png", "heatmap.tif")
#: the float32 heat written beside ``heatmap.tif`` when asked for (``raw_heat``)
RAW_HEAT_PICTURE = "heatmap_raw.tif"
