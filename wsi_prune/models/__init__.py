"""Models: the CNN triage scorer, the token-pruned ViT wrapper, the MIL head and weights."""
