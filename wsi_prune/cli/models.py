"""``wsi-prune models``: what is registered (scorers, slide heads, selection policies) and the
foundation models whose hub names resolve offline."""

from __future__ import annotations

import json

import click

from wsi_prune.cli.common import CONTEXT_SETTINGS, handle_errors

__all__ = ["models"]


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def models(as_json: bool) -> None:
    """List registered scorers, MIL slide heads, tile and token selection policies, and the
    hub models known offline. Any timm CNN name works as a scorer and any timm ViT name as
    vit.model as well.

    \b
    Example:
      wsi-prune models
    """
    from wsi_prune.models.hub import KNOWN_HUB_MODELS
    from wsi_prune.models.mil import list_mil_heads
    from wsi_prune.models.scorer import list_scorers
    from wsi_prune.selection.registry import list_policies

    listing = {
        "scorer (scorer.model)": list_scorers() or ["(any timm CNN name)"],
        "slide head (mil.model)": list_mil_heads(),
        "tile policy (tile_select.policy)": list_policies("tile"),
        "token policy (token_select.policy, vit.prune_policy)": list_policies("token"),
        "hub models known offline (vit.model: hf-hub:NAME)": sorted(KNOWN_HUB_MODELS),
    }
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    for what, names in listing.items():
        click.echo(f"{what}: {', '.join(names)}")
