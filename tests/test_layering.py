"""The package's layering: no module imports a layer above its own, and siblings stay apart.

Layers, bottom up (`README.md`, Library): the primitives (attention, embeddings,
feed-forward, rotary positions, decoding, generation, BLEU, errors, validation),
`parallel`, `moe`, then `models`, `training` and `data` side by side, `hf` (Hugging Face
checkpoints), `tasks`, and `loading` on top. The
test reads every module's imports with `ast`, those inside functions included, so
a cycle cannot hide in a function body either.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tmoe_jax"
PRIMITIVES = (
  "attention",
  "rotary",
  "embeddings",
  "feedforward",
  "decoding",
  "generation",
  "bleu",
  "errors",
  "validation",
)
# Package (or root module) -> its layer; equal layers may not import each other, except the
# primitives (errors and validation are used by the others).
LAYERS = {
  **dict.fromkeys(PRIMITIVES, 0),
  "parallel": 1,
  "moe": 2,
  "models": 3,
  "training": 3,
  "data": 3,
  "hf": 4,
  "tasks": 5,
  "loading": 6,
}


def _unit(module: str) -> str:
  """'tmoe_jax.moe.layer' -> 'moe'; 'tmoe_jax.attention' -> 'attention'."""
  return module.split(".")[1]


def _imports(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text(), filename=str(path))
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names if node.module == "tmoe_jax")
    elif isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
  return {name for name in names if name.startswith("tmoe_jax.")}


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    if relative.name != "__init__" or len(relative.parts) > 2:
      yield ".".join(relative.parts), path


def test_every_package_has_a_layer():
  units = {_unit(module) for module, _ in _modules() if module.count(".") >= 1}
  assert units <= set(LAYERS), f"give these a layer: {sorted(units - set(LAYERS))}"


@pytest.mark.parametrize("module,path", list(_modules()), ids=lambda value: str(value))
def test_no_module_imports_a_layer_above_or_beside_it(module, path):
  if module.count(".") < 1:
    return
  own = _unit(module)
  for imported in sorted(_imports(path)):
    other = _unit(imported)
    if other == own or other not in LAYERS or LAYERS[other] == LAYERS[own] == 0:
      continue
    assert LAYERS[other] < LAYERS[own], (
      f"{module} (layer {LAYERS[own]}) imports {imported} (layer {LAYERS[other]})"
    )
