"""What `tmoe_jax.load` returns for a causal_lm run: `generate(prompts, n)` and `perplexity(texts)`.

```python
run = tmoe_jax.load("runs/finetune")
run.generate(["A man in a red shirt", "Two dogs"], max_new_tokens=20)   # -> list[str]
run.generate(["A man"], 20, sampling=Sampling(temperature=0.8, top_p=0.9), seed=1)
run.perplexity(["A girl is riding a bike ."])                           # -> float
```
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
from flax import nnx
from tokenizers import Tokenizer

from tmoe_jax.data import pydoc_corpus, token_corpus
from tmoe_jax.errors import DataError
from tmoe_jax.generation import Sampling, generate_texts
from tmoe_jax.tasks.causal_lm import eval_sums, windows
from tmoe_jax.tasks.loaded_runs import LoadedRun
from tmoe_jax.training.state import TrainState


@dataclasses.dataclass(frozen=True, eq=False)
class CausalLMRun(LoadedRun):
  """A causal LM run: its `CausalLM`, the tokenizer it was trained with and its end-of-text id."""

  tokenizer: Tokenizer
  end_of_text_id: int | None
  sequence_length: int
  _eval_sums: Callable = dataclasses.field(repr=False, compare=False)

  @classmethod
  def from_task(cls, task, graphdef: nnx.GraphDef, state: TrainState) -> CausalLMRun:
    return cls(
      **cls.common_fields(task, graphdef, state),
      tokenizer=task.tokenizer,
      end_of_text_id=task.end_of_text_id,
      sequence_length=task.config.data.sequence_length,
      _eval_sums=jax.jit(
        lambda params, model_state, batch: eval_sums(params, model_state, batch, graphdef=graphdef)
      ),
    )

  def generate(
    self,
    prompts: str | Sequence[str],
    max_new_tokens: int,
    *,
    sampling: Sampling = Sampling(),
    seed: int = 0,
  ) -> list[str]:
    """Each prompt's continuation (KV-cached, batched), stopped before the end-of-text token."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(prompt, str) and prompt for prompt in prompts):
      raise DataError("prompts: expected one or more non-empty strings")
    return generate_texts(
      self.model,
      self.tokenizer,
      prompts,
      max_new_tokens,
      sampling=sampling,
      eos_id=self.end_of_text_id,
      seed=seed,
    )

  def perplexity(self, texts: Sequence[str]) -> float:
    """exp(mean next-token negative log-likelihood) of the texts, read as the run's data is (documents
    joined by the end-of-text id, windows of `sequence_length`, each token after a window's first once)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    ids = token_corpus.token_stream(self.tokenizer, texts, self.end_of_text_id)
    length = min(self.sequence_length, len(ids) - 1)
    if length < 1:
      raise DataError("texts: need at least two tokens to score")
    starts = pydoc_corpus.consecutive_window_starts(len(ids), length)
    _, params, model_state = nnx.split(self.model, nnx.Param, ...)
    sums = jax.device_get(self._eval_sums(params, model_state, windows(ids, starts, length)))
    return math.exp(float(sums["loss_sum"]) / max(float(sums["num_tokens"]), 1.0))
