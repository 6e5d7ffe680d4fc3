"""The task table: each experiment's `training.task.Task`, and what `tmoe_jax.load` makes of its
runs (`tasks.loaded_runs`), by `config.task` name."""

from tmoe_jax.tasks.causal_lm import CausalLMTask
from tmoe_jax.tasks.causal_lm_run import CausalLMRun
from tmoe_jax.tasks.image_classification import GuidedImageClassificationTask, ImageClassificationTask
from tmoe_jax.tasks.language_model import LanguageModelTask
from tmoe_jax.tasks.loaded_runs import (
  ImageClassifierRun,
  LanguageModelRun,
  PairClassifierRun,
  RegressionRun,
  Seq2SeqRun,
)
from tmoe_jax.tasks.regression import RegressionTask
from tmoe_jax.tasks.sentence_pair import SentencePairTask
from tmoe_jax.tasks.seq2seq import Seq2SeqTask

TASKS = {
  "seq2seq": Seq2SeqTask,
  "regression": RegressionTask,
  "language_model": LanguageModelTask,
  "sentence_pair": SentencePairTask,
  "image_classification": ImageClassificationTask,
  "guided_image_classification": GuidedImageClassificationTask,
  "causal_lm": CausalLMTask,
}
LOADED_RUNS = {
  "seq2seq": Seq2SeqRun,  # translate
  "regression": RegressionRun,  # predict
  "language_model": LanguageModelRun,  # generate, score
  "sentence_pair": PairClassifierRun,  # classify
  "image_classification": ImageClassifierRun,  # classify
  "guided_image_classification": ImageClassifierRun,
  "causal_lm": CausalLMRun,  # generate, perplexity
}
