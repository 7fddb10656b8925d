"""Training the models a run uses, from the slide stores ``run`` writes: the CNN triage scorer
(:mod:`wsi_prune.training.scorer`) and the MIL slide head (:mod:`wsi_prune.training.mil`)."""
