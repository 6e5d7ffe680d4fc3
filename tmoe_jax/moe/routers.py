"""The router registry: each router of `model.router` with everything a config check needs of it.

A router decides which experts see which tokens: "top_k" through the token-choice
core (`moe.token_choice`), "expert_choice" through `moe.expert_choice`; the layer
(`moe.layer.ROUTED_PATHS`) runs each. The settings (`moe.settings`) and the models
check a config against these facts when it loads, so an impossible combination
stops with a ConfigError naming the field instead of failing in a trace.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RouterType:
  """One router.

  causal: a token's experts depend on that token alone, so a decoder may use it.
  dropless: it can compute every assignment (`model.dispatch=dropless`); a router that
    fixes each expert's capacity cannot.
  expert_parallel: it has a path that splits the experts over the mesh's 'expert' axis.
  """

  causal: bool
  dropless: bool
  expert_parallel: bool


ROUTER_REGISTRY: dict[str, RouterType] = {
  # Token choice: each token picks its top-k experts (Switch k=1, GShard/Mixtral k=2).
  "top_k": RouterType(causal=True, dropless=True, expert_parallel=True),
  # Expert choice (Zhou et al. 2022): each expert picks its top-C tokens of the whole
  # batch, so a token's experts depend on the other tokens, later ones included.
  "expert_choice": RouterType(causal=False, dropless=False, expert_parallel=False),
}
ROUTERS = tuple(ROUTER_REGISTRY)
CAUSAL_ROUTERS = tuple(name for name, router in ROUTER_REGISTRY.items() if router.causal)
