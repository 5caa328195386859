"""diffusers' `FluxTransformer2DModel` holding our Flux transformer's weights: the `diffusers`
baseline of `ldm-rt bench` (`Family.diffusers_transformer`). Same parameter names, no key map."""

from __future__ import annotations


class _DiffusersFlux:
    """diffusers' FluxTransformer2DModel with our transformer's positional call signature."""

    def __init__(self, model):
        self.model = model

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None):
        return self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
                          guidance=guidance, return_dict=False)[0]


def diffusers_flux(ours):
    from ldm_rt.errors import require

    diffusers = require("diffusers", "diffusers", "the diffusers FluxTransformer2DModel baseline")
    config = {k: v for k, v in ours.config.to_dict().items() if not k.startswith("_")}
    theirs = diffusers.FluxTransformer2DModel(**config).eval()
    theirs.load_state_dict({k: v.detach().cpu() for k, v in ours.state_dict().items()}, strict=True)
    return theirs.requires_grad_(False)
