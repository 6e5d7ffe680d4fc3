"""What `tmoe_jax.load` returns: a trained run with its task's natural call.

`tasks.table.LOADED_RUNS` names each task's class; `from_task(task, graphdef, state)`
builds it from the task rebuilt from the run's config and the restored TrainState:

  seq2seq                       `Seq2SeqRun.translate(texts) -> list[str]`
  image_classification,
  guided_image_classification   `ImageClassifierRun.classify(images) -> int [N]`
  sentence_pair                 `PairClassifierRun.classify(pairs) -> int [N]` (1 = paraphrase)
  language_model                `LanguageModelRun.generate(prompt, n) -> str`, `.score(texts)`
  regression                    `RegressionRun.predict(x) -> float32 [N]`

Every model call is a function of (params, model_state, inputs) jitted once per
run and fed in batches of at most `config.eval.batch_size` rows, padded by
repeating the batch's first row to a power of two rows, so that few shapes
compile. Bad input raises DataError naming the argument.

Shapes: N inputs, B batch, L length, H x W image, C classes, E experts, I input
dimension, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from tmoe_jax.data.pair_features import encode_pairs
from tmoe_jax.data.subword import SubwordVocabulary
from tmoe_jax.data.vocabulary import NUM_SPECIAL, CharVocabulary
from tmoe_jax.data.word_vocabulary import WordVocabulary, split_words
from tmoe_jax.errors import DataError
from tmoe_jax.tasks.seq2seq import jit_decode
from tmoe_jax.training.losses import PAD_ID
from tmoe_jax.training.state import TrainState


def padded_batches(num_rows: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """(row indices, number of real rows) of consecutive batches of at most `batch_size` rows; each is
  padded by repeating its first row to a power of two rows (at most `batch_size`)."""
  for start in range(0, num_rows, batch_size):
    indices = np.arange(start, min(start + batch_size, num_rows))
    padded_rows = min(batch_size, 1 << (len(indices) - 1).bit_length())
    yield np.concatenate([indices, np.full(padded_rows - len(indices), start)]), len(indices)


def jit_apply(graphdef: nnx.GraphDef, fn: Callable[..., Any]) -> Callable[..., Any]:
  """jax.jit of (params, model_state, *inputs) -> fn(model, *inputs), the model merged from its state."""

  @jax.jit
  def apply(params, model_state, *inputs):
    return fn(nnx.merge(graphdef, params, model_state), *inputs)

  return apply


def _texts(texts: Sequence[str], name: str) -> list[str]:
  if isinstance(texts, str):
    raise DataError(f"{name}: expected a list of strings, not one str")
  texts = list(texts)
  for index, text in enumerate(texts):
    if not isinstance(text, str):
      raise DataError(f"{name}[{index}]: expected str, got {type(text).__name__}")
  return texts


def _real_array(values, name: str, shape: tuple[int | None, ...], shape_text: str) -> np.ndarray:
  """`values` as a numpy array of a real (int or float) dtype and `shape` (None: any size), all finite."""
  try:
    array = np.asarray(values)
  except ValueError as error:  # e.g. nested lists of unequal lengths
    raise DataError(f"{name}: cannot be read as an array ({error})") from None
  if array.dtype == bool or not (
    np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
  ):
    raise DataError(f"{name}: expected an array of numbers, got dtype {array.dtype}")
  if array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape)):
    raise DataError(f"{name}: expected shape {shape_text}, got {list(array.shape)}")
  if not np.all(np.isfinite(array)):
    raise DataError(f"{name}: has non-finite values (nan or inf)")
  return array


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedRun:
  """A trained run, restored from its workdir.

  config: the run's resolved config (locked), with any eval overrides applied.
  model: the restored nnx model, with the checkpoint's parameters and non-parameter state.
  step: the training step of the restored checkpoint.
  """

  config: ml_collections.ConfigDict
  model: nnx.Module
  step: int

  @classmethod
  def from_task(cls, task, graphdef: nnx.GraphDef, state: TrainState) -> LoadedRun:
    """The run of `task` (rebuilt from the run's config, its files read back) restored to `state`;
    `graphdef` is the model's graph definition."""
    raise NotImplementedError

  @staticmethod
  def common_fields(task, graphdef: nnx.GraphDef, state: TrainState) -> dict[str, Any]:
    return {
      "config": task.config,
      "model": nnx.merge(graphdef, state.params, state.model_state),
      "step": int(state.step),
    }

  def _apply_in_batches(self, apply: Callable[..., Any], inputs: Any) -> Any:
    """apply(params, model_state, inputs) over the rows of `inputs` (arrays with N leading rows), in
    `padded_batches` of config.eval.batch_size; the outputs' real rows, concatenated as numpy arrays."""
    _, params, model_state = nnx.split(self.model, nnx.Param, ...)
    num_rows = len(jax.tree.leaves(inputs)[0])
    outputs = []
    for indices, num_valid in padded_batches(num_rows, self.config.eval.batch_size):
      batch = jax.tree.map(lambda values, rows=indices: values[rows], inputs)
      output = jax.device_get(apply(params, model_state, batch))
      outputs.append(jax.tree.map(lambda values, real=num_valid: values[:real], output))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


# ---------------------------------------------------------------------------- seq2seq


@dataclasses.dataclass(frozen=True, eq=False)
class Seq2SeqRun(LoadedRun):
  """A seq2seq run: `translate(texts)`. `model` is the Transformer.

  vocabulary: the vocabulary (characters or subwords) the model's token ids refer to.
  max_source_length / max_target_length: the padded lengths (EOS included) the
    model was trained on; `translate` pads sources to, and decodes up to, them.
  """

  vocabulary: CharVocabulary | SubwordVocabulary
  max_source_length: int
  max_target_length: int
  _decode: Callable = dataclasses.field(repr=False, compare=False)

  @classmethod
  def from_task(cls, task, graphdef: nnx.GraphDef, state: TrainState) -> Seq2SeqRun:
    data, eval_config = task.data, task.config.eval
    decode = jit_decode(
      graphdef,
      max_length=data.max_target_length,
      beam_size=eval_config.beam_size,
      bos_id=data.vocabulary.BOS_ID,
      eos_id=data.vocabulary.EOS_ID,
      length_penalty=eval_config.length_penalty,
    )
    return cls(
      **cls.common_fields(task, graphdef, state),
      vocabulary=data.vocabulary,
      max_source_length=data.max_source_length,
      max_target_length=data.max_target_length,
      _decode=decode,
    )

  def source_length(self, text: str) -> int:
    """How many ids `text` encodes to, EOS included; `translate` accepts up to `max_source_length`."""
    return len(self.vocabulary.encode(text))

  def translate(self, texts: Sequence[str]) -> list[str]:
    """Decodes each text (greedy, or beam search when config.eval.beam_size > 1); one output per input.

    Raises DataError naming the first text longer than `max_source_length` ids.
    """
    texts = _texts(texts, "texts")
    for index, text in enumerate(texts):
      length = self.source_length(text)
      if length > self.max_source_length:
        raise DataError(
          f"texts[{index}] {text[:60]!r}: {length} tokens with EOS; this model reads at most "
          f"{self.max_source_length}"
        )
    if not texts:
      return []
    # Padding rows repeat a batch's first text (a row of padding would attend to nothing).
    source_NxS = self.vocabulary.encode_batch(texts, self.max_source_length)
    decoded_NxL = self._apply_in_batches(self._decode, source_NxS)
    return [self.vocabulary.decode(row) for row in decoded_NxL]


# ---------------------------------------------------------------------------- image classification


def _image_outputs(model, images_BxHxW):
  output = model(images_BxHxW)
  return output.log_probs_BxC, output.router_probs_BxE


@dataclasses.dataclass(frozen=True, eq=False)
class ImageClassifierRun(LoadedRun):
  """An image-classification run (plain or guided): `classify(images)`. `model` is the `ImageMoE`.

  Images are pixels on the 0..255 scale of the dataset files (uint8, or any int or
  float dtype with values in [0, 255]: multiply images scaled to [0, 1] by 255),
  [N, image_height, image_width]; they are standardised as the task standardises
  its batches (`normalize`). At inference the learned gate routes alone (no label owner).
  """

  image_height: int
  image_width: int
  num_classes: int
  _normalize: Callable[[np.ndarray], np.ndarray] = dataclasses.field(repr=False, compare=False)
  _forward: Callable = dataclasses.field(repr=False, compare=False)

  @classmethod
  def from_task(cls, task, graphdef: nnx.GraphDef, state: TrainState) -> ImageClassifierRun:
    return cls(
      **cls.common_fields(task, graphdef, state),
      image_height=task.model_config.image_height,
      image_width=task.model_config.image_width,
      num_classes=task.model_config.num_classes,
      _normalize=task.normalize,
      _forward=jit_apply(graphdef, _image_outputs),
    )

  def _outputs(self, images) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [N, C] class log-probabilities of the mixture, float32 [N, E] gate softmax)."""
    height, width = self.image_height, self.image_width
    images_NxHxW = _real_array(images, "images", (None, height, width), f"[N, {height}, {width}]")
    if images_NxHxW.size and (images_NxHxW.min() < 0 or images_NxHxW.max() > 255):
      raise DataError(
        f"images: pixel values must be in [0, 255] (the dataset's scale), got [{images_NxHxW.min()}, "
        f"{images_NxHxW.max()}]"
      )
    if not len(images_NxHxW):
      num_experts = self.model.config.num_experts
      return np.zeros((0, self.num_classes), np.float32), np.zeros((0, num_experts), np.float32)
    return self._apply_in_batches(self._forward, self._normalize(images_NxHxW))

  def classify(self, images) -> np.ndarray:
    """int64 [N]: the most probable class of each image."""
    return np.argmax(self._outputs(images)[0], axis=1)

  def probabilities(self, images) -> np.ndarray:
    """float32 [N, C]: the mixture's class probabilities of each image."""
    return np.exp(self._outputs(images)[0])

  def gate_probabilities(self, images) -> np.ndarray:
    """float32 [N, E]: the learned gate's softmax over the experts for each image."""
    return self._outputs(images)[1]


# ---------------------------------------------------------------------------- sentence pair


def _pair_logits(model, batch):
  logits_Bx2, _ = model.selected_network().batch_logits(batch)
  return logits_Bx2.astype(jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class PairClassifierRun(LoadedRun):
  """A sentence-pair (paraphrase) run: `classify(pairs)`.

  `model` is the checkpointed `SelectedClassifier`: the trained `PairClassifier`
  and the weights selected on the validation split, which every call uses (the
  current ones while nothing was selected), as the task's evaluation does.
  Pairs are tokenised and featurised as in training: whitespace tokens
  (lowercased per `data.lowercase`), `data.pair_features.encode_pairs` with
  the run's vocabulary, truncated to `data.max_length` joint tokens.
  """

  vocabulary: WordVocabulary
  _forward: Callable = dataclasses.field(repr=False, compare=False)

  @classmethod
  def from_task(cls, task, graphdef: nnx.GraphDef, state: TrainState) -> PairClassifierRun:
    return cls(
      **cls.common_fields(task, graphdef, state),
      vocabulary=task.data.vocabulary,
      _forward=jit_apply(graphdef, _pair_logits),
    )

  def encode(self, pairs: Sequence[tuple[str, str]]) -> dict[str, np.ndarray]:
    """The model inputs of `pairs` (`encode_pairs` arrays: token, segment and overlap ids, features)."""
    if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(s, str) for s in pairs):
      raise DataError("pairs: expected a list of (sentence1, sentence2) pairs, not one pair")
    if isinstance(pairs, str):
      raise DataError("pairs: expected a list of (sentence1, sentence2) pairs, not one str")
    pairs = list(pairs)
    for index, pair in enumerate(pairs):
      if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
        raise DataError(f"pairs[{index}]: expected a (sentence1, sentence2) pair, got {pair!r:.80}")
      for side, sentence in enumerate(pair):
        if not isinstance(sentence, str):
          raise DataError(f"pairs[{index}][{side}]: expected str, got {type(sentence).__name__}")
    lowercase = self.config.data.lowercase
    first = [split_words(a, lowercase=lowercase) for a, _ in pairs]
    second = [split_words(b, lowercase=lowercase) for _, b in pairs]
    return encode_pairs(first, second, self.vocabulary, self.config.data.max_length)

  def logits(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """float32 [N, 2]: the classifier's logits of each pair (class 1 = paraphrase)."""
    batch = self.encode(pairs)
    if not len(batch["token_ids"]):
      return np.zeros((0, 2), np.float32)
    return self._apply_in_batches(self._forward, batch)

  def classify(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """int64 [N]: 1 where the model takes the two sentences for paraphrases, else 0."""
    return np.argmax(self.logits(pairs), axis=1)

  def probabilities(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """float32 [N, 2]: softmax of the logits; column 1 is the paraphrase probability."""
    return np.asarray(jax.nn.softmax(self.logits(pairs), axis=-1))


# ---------------------------------------------------------------------------- language model


def _next_logits(model, tokens_BxL, last_B):
  """float32 [B, V]: the logits after position last_B[b] of row b."""
  logits_BxLxV, _ = model(tokens_BxL, deterministic=True)
  return logits_BxLxV[jnp.arange(tokens_BxL.shape[0]), last_B]


def _token_nll(model, batch):
  """float32 [B, L]: each target's negative log-likelihood in nats, 0 at PAD targets."""
  logits_BxLxV, _ = model(batch["inputs"], deterministic=True)
  targets_BxL = batch["targets"]
  nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV.astype(jnp.float32), targets_BxL)
  return jnp.where(targets_BxL != PAD_ID, nll_BxL, 0.0)


@dataclasses.dataclass(frozen=True, eq=False)
class LanguageModelRun(LoadedRun):
  """A character language-model run: `generate(prompt, max_new_tokens)` and `score(texts)`.

  `model` is the `LanguageModel`; it reads at most `max_length` characters of
  context (its training window). Texts must use only the characters of the
  corpus (`vocabulary`). The model is exactly causal with `model.ffn` "dense" or
  "smoe"; with "moe", expert capacity is shared by the positions of a window, so
  a character's prediction can depend on the padding or characters after it.
  """

  vocabulary: CharVocabulary
  max_length: int
  _next_logits: Callable = dataclasses.field(repr=False, compare=False)
  _token_nll: Callable = dataclasses.field(repr=False, compare=False)

  @classmethod
  def from_task(cls, task, graphdef: nnx.GraphDef, state: TrainState) -> LanguageModelRun:
    return cls(
      **cls.common_fields(task, graphdef, state),
      vocabulary=task.corpus.vocabulary,
      max_length=task.model_config.max_length,
      _next_logits=jit_apply(graphdef, _next_logits),
      _token_nll=jit_apply(graphdef, _token_nll),
    )

  def _ids(self, text: str, name: str) -> list[int]:
    ids = self.vocabulary.encode(text, add_eos=False)
    if self.vocabulary.UNK_ID in ids:
      unknown = sorted({c for c, i in zip(text, ids) if i == self.vocabulary.UNK_ID})
      raise DataError(f"{name}: characters {''.join(unknown)!r} are not in the model's vocabulary")
    return ids

  def generate(self, prompt: str, max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0) -> str:
    """The `max_new_tokens` characters the model writes after `prompt` (the prompt not included).

    Each character is predicted from the last `max_length` characters (prompt and
    output), recomputed in full at each step: the most probable one with
    `temperature` 0 (greedy), else one drawn from softmax(logits / temperature) by a
    generator seeded with `seed`. The special ids (padding, BOS, EOS, unknown) are
    never training targets and are never produced.
    """
    if not isinstance(prompt, str):
      raise DataError(f"prompt: expected str, got {type(prompt).__name__}")
    if not prompt:
      raise DataError("prompt: must have at least one character (the model has no start token)")
    if (
      isinstance(max_new_tokens, bool)
      or not isinstance(max_new_tokens, (int, np.integer))
      or max_new_tokens < 0
    ):
      raise DataError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if (
      isinstance(temperature, bool)
      or not isinstance(temperature, (int, float))
      or not 0 <= temperature < math.inf
    ):
      raise DataError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    ids = self._ids(prompt, "prompt")
    _, params, model_state = nnx.split(self.model, nnx.Param, ...)
    rng = np.random.default_rng(seed)
    tokens_1xL = np.zeros((1, self.max_length), np.int32)
    generated = []
    for _ in range(max_new_tokens):
      context = ids[-self.max_length :]
      tokens_1xL[0, : len(context)] = context
      tokens_1xL[0, len(context) :] = PAD_ID
      logits_V = np.asarray(
        self._next_logits(params, model_state, tokens_1xL, np.array([len(context) - 1], np.int32))[0],
        np.float64,
      )
      logits_V[:NUM_SPECIAL] = -np.inf
      if temperature == 0:
        next_id = int(np.argmax(logits_V))
      else:
        scaled = (logits_V - logits_V.max()) / temperature
        probabilities = np.exp(scaled)
        next_id = int(rng.choice(len(logits_V), p=probabilities / probabilities.sum()))
      ids.append(next_id)
      generated.append(next_id)
    return self.vocabulary.decode(np.asarray(generated, np.int64))

  def score(self, texts: Sequence[str]) -> np.ndarray:
    """float64 [N]: the mean negative log-likelihood, in nats per character, of each text's
    characters after its first (divide by ln 2 for bits per character).

    A text is read in consecutive windows of `max_length` characters, as the
    task's evaluation reads a split: the context restarts at each window.
    """
    texts = _texts(texts, "texts")
    inputs, targets, owners = [], [], []
    length = self.max_length
    for index, text in enumerate(texts):
      ids = np.asarray(self._ids(text, f"texts[{index}]"), np.int32)
      if len(ids) < 2:
        raise DataError(f"texts[{index}]: needs at least 2 characters (the first is not predicted)")
      for start in range(0, len(ids) - 1, length):
        window = np.full(length + 1, PAD_ID, np.int32)
        piece = ids[start : start + length + 1]
        window[: len(piece)] = piece
        inputs.append(window[:-1])
        targets.append(window[1:])
        owners.append(index)
    if not texts:
      return np.zeros(0, np.float64)
    nll_WxL = self._apply_in_batches(
      self._token_nll, {"inputs": np.stack(inputs), "targets": np.stack(targets)}
    )
    counts_W = np.sum(np.stack(targets) != PAD_ID, axis=1)
    sums_N = np.bincount(owners, weights=np.sum(nll_WxL, axis=1, dtype=np.float64), minlength=len(texts))
    return sums_N / np.bincount(owners, weights=counts_W, minlength=len(texts))


# ---------------------------------------------------------------------------- regression


def _regression_outputs(model, x_BxI):
  y_B, _ = model(x_BxI)
  return y_B


@dataclasses.dataclass(frozen=True, eq=False)
class RegressionRun(LoadedRun):
  """A regression run: `predict(x)`. `model` is the mixture of MLPs (or the dense MLP)."""

  input_dim: int
  _forward: Callable = dataclasses.field(repr=False, compare=False)

  @classmethod
  def from_task(cls, task, graphdef: nnx.GraphDef, state: TrainState) -> RegressionRun:
    return cls(
      **cls.common_fields(task, graphdef, state),
      input_dim=task.model_config.input_dim,
      _forward=jit_apply(graphdef, _regression_outputs),
    )

  def predict(self, x) -> np.ndarray:
    """float32 [N]: the model's prediction for each row of `x` [N, input_dim]."""
    x_NxI = _real_array(x, "x", (None, self.input_dim), f"[N, {self.input_dim}]").astype(np.float32)
    if not len(x_NxI):
      return np.zeros(0, np.float32)
    return self._apply_in_batches(self._forward, x_NxI)
