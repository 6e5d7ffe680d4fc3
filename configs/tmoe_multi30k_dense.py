"""The dense baseline of `tmoe_multi30k`: the same Transformer with dense FFNs of the same
active parameters per token as the MoE model's top-2 experts (d_ff = 2 * 512).

  python -m train --config configs/tmoe_multi30k_dense.py --config.data.dir=DIR --workdir runs/tmoe_multi30k_dense
"""

import ml_collections

from configs import tmoe_multi30k


def get_config() -> ml_collections.ConfigDict:
  config = tmoe_multi30k.get_config()
  config.model.d_ff = config.model.top_k * config.model.d_ff
  config.model.moe_every = 0
  return config
