"""Evaluating runs: slide-level metrics, the CAMELYON16 FROC, pruned-versus-dense fidelity and
their reports (``wsi-prune evaluate``)."""
