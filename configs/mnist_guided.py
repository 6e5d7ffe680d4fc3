"""Guided MNIST MoE: expert i owns digits {2i, 2i+1}; training pushes the gate toward the owner.

The model of configs/mnist_moe.py. In training the gate's logits are masked to the label's
owner expert (teacher forcing: each expert learns only its own two digits) and a gate loss
(cross-entropy, or the binary cross-entropy of the original) pulls the learned gate toward
the owner; at test time the learned gate alone decides. Reports test accuracy, the gate's
routing agreement with the label map and each expert's accuracy on its own digits.

Run:
  python -m train --config configs/mnist_guided.py --config.data.dir=../shared/data/mnist \\
      --workdir runs/mnist_guided
The original's gate loss:
  python -m train --config configs/mnist_guided.py --config.data.dir=../shared/data/mnist \\
      --config.model.guided_gate_loss=binary_cross_entropy --workdir runs/mnist_guided_bce
"""

import ml_collections

from configs import mnist_moe


def get_config() -> ml_collections.ConfigDict:
  config = mnist_moe.get_config()
  config.task = "guided_image_classification"
  model = config.model
  # The test accuracy is bounded by how well the gate routes: a hidden layer routes
  # digit pairs far better than the original's linear gate (gate_hidden_dim=0).
  model.gate_hidden_dim = 256
  # Each expert only ever learns its own digits, so at test time the gate's choice should pick
  # between whole predictions: a mixture of probabilities (with the one-hot training gate both
  # combines are the owner's cross-entropy).
  model.combine = "probabilities"
  model.guided_gate_loss = "cross_entropy"  # or "binary_cross_entropy" (the original's)
  model.guided_gate_loss_weight = 1.0  # total loss = classification NLL + weight * gate loss
  model.mask_gate_by_label = True  # teacher forcing: in training the mixture uses the owner expert only
  model.labels_per_expert = 2  # expert i owns labels {2i, 2i+1}: 5 experts cover the 10 digits
  return config
