"""`python -m bench.device_check --tiny` on 8 virtual CPU devices: every check runs and passes, and the
JSON report holds the documented fields. The GPU/TPU sizes are the same code with `SIZES["full"]`.

Speed is never asserted; MFU is null on CPU, with a note.
"""

from __future__ import annotations

import json

import jax
import pytest

from bench import device_check
from bench.train_step import train_flops_per_step
from tmoe_jax.models.transformer import TransformerConfig

TRAIN_STEP_KEYS = {
  "passed",
  "dispatch",
  "mesh",
  "dtype",
  "d_model",
  "num_experts",
  "top_k",
  "seq_len",
  "batch_size",
  "params",
  "compile_seconds",
  "seconds",
  "times",
  "losses",
  "tokens_per_step",
  "tokens_per_second",
  "flops_per_step",
  "model_tflops_per_second",
  "device_kind",
  "peak_flops_per_device",
  "mfu",
  "lowered_ops",
  "compiled_ops",
  "check_seconds",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  path = tmp_path_factory.mktemp("device_check") / "report.json"
  # The dropless train step is left out to keep the test short (its kernels are checked by
  # ragged_dot_vs_block_loop and expert_parallel_vs_one_device; tests/test_lowering.py lowers it).
  assert device_check.main(["--tiny", "--dispatches", "capacity", "--json", str(path)]) == 0
  return json.loads(path.read_text())


def test_tiny_run_passes_every_check(report):
  assert report["passed"] is True
  assert report["tiny"] is True
  assert report["backend"] == "cpu" and report["device_count"] == jax.device_count() == 8
  assert (report["dropless_method_auto"], report["dropless_exchange_auto"]) == ("block_loop", "padded")
  assert set(report["checks"]) == {
    "ragged_dot_vs_block_loop",
    "expert_parallel_vs_one_device",
    "train_step_capacity",
  }
  for name, check in report["checks"].items():
    assert check["passed"] is True, (name, check)


def test_kernel_and_expert_parallel_checks_compare_every_case(report):
  kernels = report["checks"]["ragged_dot_vs_block_loop"]
  assert {(c["expert_type"], c["empty_expert"]) for c in kernels["cases"]} == {
    (t, e) for t in ("mlp", "gated") for e in (False, True)
  }
  for case in kernels["cases"]:
    assert case["error_vs_block_loop_same_device"] <= device_check.TOLERANCE
  layer = report["checks"]["expert_parallel_vs_one_device"]
  assert layer["mesh"] == {"data": 1, "expert": 8}
  assert layer["dropless_exchange"] == "padded"
  assert [c["dispatch"] for c in layer["cases"]] == ["capacity", "dropless"]
  for case in layer["cases"]:
    assert case["dropped_fraction"] == 0.0
    assert max(v for k, v in case.items() if k.startswith("error")) <= device_check.TOLERANCE


def test_train_step_fields_and_flop_count(report):
  step = report["checks"]["train_step_capacity"]
  assert TRAIN_STEP_KEYS <= set(step)
  sizes = device_check.SIZES["tiny"]
  assert step["mesh"] == {"data": 1, "expert": 8}
  assert step["batch_size"] == sizes.rows_per_device * 8 and step["dtype"] == "bfloat16"
  assert step["tokens_per_step"] == step["batch_size"] * 2 * step["seq_len"]
  assert step["tokens_per_second"] == pytest.approx(step["tokens_per_step"] / step["seconds"])
  config, _ = device_check.train_config(sizes, "capacity", 8)
  model_config = TransformerConfig.from_config(config.model, vocab_size=sizes.vocab_size)
  expected = train_flops_per_step(model_config, step["batch_size"], step["seq_len"], step["seq_len"])
  assert step["flops_per_step"] == expected
  # CPU: no known peak, so no MFU, and the note says why.
  assert step["mfu"] is None and step["peak_flops_per_device"] is None and "cpu" in step["mfu_note"]
  # Expert-parallel over 8 devices: the capacity exchange is in the lowered and compiled step.
  assert step["lowered_ops"]["all_to_all"] > 0 and step["compiled_ops"]["all_to_all"] > 0


@pytest.mark.parametrize(
  "device_kind, peak",
  [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("cpu", None),
    ("NVIDIA GeForce RTX 4090", None),
  ],
)
def test_peak_table(device_kind, peak):
  assert device_check.peak_flops(device_kind) == peak


def test_mfu_counts_every_device():
  result = device_check.throughput(989e12, 1000, 0.5, "NVIDIA H100 80GB HBM3", 2)
  assert result["tokens_per_second"] == 2000
  assert result["mfu"] == pytest.approx(1.0)  # 989 TFLOP in 0.5 s on 2 devices of 989 TFLOP/s
  assert "mfu_note" not in result
  unknown = device_check.throughput(1e12, 1000, 1.0, "Some Accelerator", 1)
  assert unknown["mfu"] is None and "Some Accelerator" in unknown["mfu_note"]


def test_full_sizes_refuse_to_run_on_cpu(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    device_check.main(["--json", str(tmp_path / "report.json")])
  assert exit_info.value.code == 2
  assert "--tiny" in capsys.readouterr().err
  assert not (tmp_path / "report.json").exists()


def test_relative_error():
  assert device_check.relative_error({"a": [1.0, 2.0]}, {"a": [1.0, 2.0]}) == 0.0
  assert device_check.relative_error([1.0, 2.1], [1.0, 2.0]) == pytest.approx(0.05)
  assert device_check.relative_error([0.0], [0.0]) == 0.0
