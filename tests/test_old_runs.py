"""A workdir written before routing groups existed still loads and resumes as it was trained.

`fixtures/seq2seq_run_v0` was written by `python -m train` at commit bca3e96 (the command
is in `seq2seq_run_v0_expected.json`, with what that code produced from it): its
config.json has no `model.sequences_per_group`, and the run decided capacity over the
whole batch. Missing keys must read as the behaviour the run had (`workdir.KEYS_ADDED_LATER`).
"""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np

import configs.tmoe
import tmoe_jax
from tmoe_jax.tasks import runner
from tmoe_jax.training.workdir import CONFIG_FILE

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "seq2seq_run_v0"
EXPECTED = json.loads((FIXTURE.parent / "seq2seq_run_v0_expected.json").read_text())


def _fixture_config(num_steps):
  """The fixture's command line, as a config (current defaults for every key it did not set)."""
  config = configs.tmoe.get_config()
  for part in EXPECTED["command"].split():
    if part.startswith("--config."):
      dotted, _, text = part[len("--config.") :].partition("=")
      section, key = dotted.split(".")
      old = config[section][key]
      config[section][key] = text == "True" if isinstance(old, bool) else type(old)(text)
  config.train.num_steps = num_steps
  return config


def test_the_fixture_predates_routing_groups():
  saved = json.loads((FIXTURE / CONFIG_FILE).read_text())
  assert "sequences_per_group" not in saved["model"]


def test_an_old_run_loads_and_translates_as_the_code_that_wrote_it():
  run = tmoe_jax.load(FIXTURE)
  assert run.config.model.sequences_per_group == 0
  assert run.translate(EXPECTED["texts"]) == EXPECTED["translations"]
  source = jnp.asarray(run.vocabulary.encode_batch(EXPECTED["texts"], 16))
  decoder_input = jnp.asarray(run.vocabulary.encode_batch(["1998-03-03"] * 3, 12))
  logits, _ = run.model(source, decoder_input)
  np.testing.assert_allclose(np.asarray(logits[0, 0, :8]), EXPECTED["logits_first"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(jnp.sum(jnp.abs(logits))), EXPECTED["logits_abs_sum"], rtol=1e-5)


def test_an_old_run_resumes_where_the_code_that_wrote_it_would_have_gone(tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(FIXTURE, workdir)
  config = _fixture_config(num_steps=5)
  assert config.model.sequences_per_group != 0  # today's default differs from the run's
  runner.train(config, workdir)
  assert "predates this key" in capsys.readouterr().err
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [row["loss"] for row in rows if row["split"] == "train" and row["step"] in (4, 5)]
  np.testing.assert_allclose(losses, EXPECTED["train_loss_steps_4_5_of_an_uninterrupted_run"], rtol=1e-5)
  assert json.loads((workdir / CONFIG_FILE).read_text())["model"]["sequences_per_group"] == 0
