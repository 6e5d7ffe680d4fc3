"""Smoke tests of the benchmarks in bench/: each main runs on tiny shapes and writes its JSON rows.

Speed is measured by the benchmarks, never asserted here. What is checked: the
documented JSON keys, the model-FLOP count against a count done by hand, the
memory peak estimate's arithmetic, the plot file, and that the PyTorch layers
compute what our JAX layers compute (skipped without torch).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from bench import grouped_matmul, memory, moe_layer, plot_time_per_token, train_step, vs_pytorch
from tmoe_jax.models.transformer import TransformerConfig
from tmoe_jax.moe.layer import MoEFeedForward
from tmoe_jax.moe.settings import MoEConfig

TRAIN_STEP_KEYS = {
  "size",
  "backend",
  "device_kind",
  "dtype",
  "dispatch",
  "params",
  "tokens_per_step",
  "seconds",
  "min_seconds",
  "repeats",
  "compile_seconds",
  "tokens_per_second",
  "flops_per_step",
  "model_tflops_per_second",
  "peak_flops",
  "mfu",
  "gemm_peak_flops",
  "gemm_size",
  "gemm_mfu",
  "gemm_mfu_fastest",
  "cpu_seconds",
  "gemm_mfu_cpu_time",
  "matmul_seconds",
  "matmul_gemm_mfu",
  "load_average",
}
MEMORY_KEYS = {
  "step",
  "variant",
  "num_experts",
  "tokens",
  "params",
  "argument_bytes",
  "output_bytes",
  "alias_bytes",
  "temp_bytes",
  "peak_bytes",
  "measured_peak_bytes",
}
VS_PYTORCH_KEYS = {
  "framework",
  "layer",
  "optimizer",
  "num_experts",
  "top_k",
  "tokens",
  "seconds",
  "min_seconds",
  "repeats",
  "torch_loop_ratio",
}


def test_flops_match_a_hand_count():
  # D=4, F=8, E=4, K=2, V=10, one encoder and one decoder layer, both MoE; B=1, S=2, L=3.
  config = TransformerConfig.from_flat(
    vocab_size=10,
    d_model=4,
    num_heads=1,
    num_layers=1,
    num_decoder_layers=1,
    d_ff=8,
    num_experts=4,
    top_k=2,
    moe_every=1,
    max_length=8,
  )
  moe = 4 * 4 + 2 * (2 * 4 * 8)  # router D*E + K experts of 2*D*F = 16 + 128 = 144 weights
  source = 4 * 16 + moe + 2 * 16  # self-attention QKVO + MoE + decoder cross K, V = 240
  target = 4 * 16 + 2 * 16 + moe + 4 * 10  # self QKVO + cross Q, O + MoE + logits D*V = 280
  per_source_token = 6 * source + 12 * 2 * 4  # + attention over S=2 keys: 1536
  per_target_token = 6 * target + 12 * (3 + 2) * 4  # + self (L=3) and cross (S=2) attention: 1920
  assert 2 * per_source_token + 3 * per_target_token == 8832
  assert train_step.train_flops_per_step(config, 1, 2, 3) == 8832
  # Batch scales linearly; a dense FFN (moe_every=0) costs 2*D*F = 64 weights instead of 144.
  assert train_step.train_flops_per_step(config, 3, 2, 3) == 3 * 8832
  dense = dataclasses.replace(config, moe_every=0)
  assert train_step.train_flops_per_step(dense, 1, 2, 3) == 8832 - 6 * (144 - 64) * (2 + 3)


def test_peak_flops_by_device_kind():
  assert train_step.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert train_step.peak_flops("NVIDIA H200") == 989e12
  assert train_step.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert train_step.peak_flops("TPU v4") == 275e12
  assert train_step.peak_flops("TPU v5 lite") == 197e12
  assert train_step.peak_flops("cpu") is None


def test_train_step_main_writes_rows(tmp_path):
  path = tmp_path / "train_step.json"
  argv = ["--sizes", "tiny", "--repeats", "2", "--gemm-sizes", "32,64", "--json", str(path)]
  assert train_step.main(argv) == 0
  (row,) = json.loads(path.read_text())
  assert TRAIN_STEP_KEYS <= row.keys()
  assert row["dispatch"] == "dropless"  # the default: the block loop on CPU
  size = train_step.SIZES["tiny"]
  config = train_step.transformer_config(size)
  flops = train_step.train_flops_per_step(config, size.batch_size, size.seq_len, size.seq_len)
  assert row["flops_per_step"] == flops
  # The matmul shapes timed alone are the FLOPs counted (tiny: T K / E = 16 * 2 / 4 rows per expert).
  matmuls = train_step.step_matmuls(config, size.batch_size, size.seq_len, size.seq_len)
  assert sum(use.flops for use in matmuls) == flops
  assert row["gemm_size"] in (32, 64) and row["gemm_peak_flops"] > 0
  assert row["gemm_mfu"] == pytest.approx(flops / row["seconds"] / row["gemm_peak_flops"])
  assert row["gemm_mfu_fastest"] >= row["gemm_mfu"] > 0 and row["gemm_mfu_cpu_time"] > 0
  assert row["matmul_seconds"] > 0
  assert row["matmul_gemm_mfu"] == pytest.approx(flops / row["matmul_seconds"] / row["gemm_peak_flops"])
  assert row["tokens_per_step"] == 2 * size.batch_size * size.seq_len
  assert row["repeats"] == 2 and 0 < row["min_seconds"] <= row["seconds"]
  assert row["tokens_per_second"] == pytest.approx(row["tokens_per_step"] / row["seconds"])
  assert row["mfu"] is None and row["peak_flops"] is None  # CPU: no known peak


def test_memory_main_writes_rows(tmp_path):
  path = tmp_path / "memory.json"
  argv = ["--num-experts", "2,4", "--tokens", "16", "--dispatch", "dense_ffn,capacity", "--size", "tiny"]
  argv += ["--remat", "none,full", "--remat-size", "tiny", "--grad-accum", ""]
  assert memory.main(argv + ["--json", str(path)]) == 0
  rows = json.loads(path.read_text())
  assert [(r["step"], r["variant"], r["num_experts"]) for r in rows] == [
    ("moe_layer", "dense_ffn", 2),
    ("moe_layer", "capacity", 2),
    ("moe_layer", "capacity", 4),
    ("train_step", "tiny", 2),
    ("train_step", "tiny", 4),
    ("train_step_remat", "none", 4),
    ("train_step_remat", "full", 4),
  ]
  for row in rows:
    assert MEMORY_KEYS <= row.keys()
    assert (
      row["peak_bytes"]
      == row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
    )
    assert row["measured_peak_bytes"] is None  # CPU keeps no memory statistics
  layer_2, layer_4 = rows[1], rows[2]
  # Parameters and both Adam moments are arguments: at least 3 float32 copies of the parameters.
  assert layer_4["argument_bytes"] >= 3 * 4 * layer_4["params"]
  assert layer_4["peak_bytes"] > layer_2["peak_bytes"]
  # Full remat keeps less for the backward pass (the compiled temp bytes fall only off CPU).
  assert rows[-1]["residual_bytes"] < rows[-2]["residual_bytes"]


def test_memory_update_replaces_the_rows_run_again(tmp_path):
  path = tmp_path / "memory.json"
  argv = ["--dispatch", "", "--size", "", "--remat-size", "tiny", "--grad-accum", "", "--json", str(path)]
  assert memory.main(argv + ["--remat", "none,full"]) == 0
  old = json.loads(path.read_text())
  assert memory.main(argv + ["--remat", "full,save_dots", "--update"]) == 0
  rows = json.loads(path.read_text())
  assert [r["variant"] for r in rows] == ["none", "full", "save_dots"]
  assert rows[0] == old[0]


def test_memory_grad_accum_rows(tmp_path):
  """The default experiment's step (`tasks.lowering.sharded_train_step`) per microbatch count, on a
  small batch: the same arguments, less temporary memory in 4 microbatches."""
  path = tmp_path / "memory.json"
  argv = ["--dispatch", "", "--size", "", "--remat", "", "--json", str(path)]
  argv += ["--grad-accum", "1,4", "--grad-accum-batch", "64", "--grad-accum-length", "8"]
  assert memory.main(argv) == 0
  rows = json.loads(path.read_text())
  # Run in growing size: most microbatches first.
  assert [(r["step"], r["variant"], r["microbatches"]) for r in rows] == [
    ("train_step_grad_accum", "4", 4),
    ("train_step_grad_accum", "1", 1),
  ]
  four, one = rows
  for row in rows:
    assert MEMORY_KEYS <= row.keys()
    assert row["tokens"] == 64 * 2 * 8 and row["batch_size"] == 64 and row["num_experts"] == 4
    assert (
      row["peak_bytes"]
      == row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
    )
    assert row["measured_peak_bytes"] is None
  assert four["argument_bytes"] == one["argument_bytes"] and four["params"] == one["params"]
  assert four["temp_bytes"] < one["temp_bytes"]
  lines = memory.grad_accum_lines(rows)
  assert lines[0].startswith("grad_accum 4 microbatches of 16 rows:")
  assert lines[1].startswith("grad_accum 1 microbatches of 64 rows:") and "(1.00x)" in lines[1]


def test_plot_time_per_token(tmp_path):
  rows = [
    {"dispatch": dispatch, "num_experts": experts, "seconds": seconds, "fwd_bwd_seconds": seconds / 2}
    for dispatch, experts, seconds in [
      ("dense_ffn", 8, 0.8192),
      ("dense_ffn", 16, 0.8192),
      ("capacity", 16, 1.6384),
      ("capacity", 8, 1.2288),
      ("adam_update_experts", 8, 0.1),
    ]
  ]
  series = plot_time_per_token.time_per_token_series(rows, tokens=8192)
  assert series == {"dense_ffn": [(8, 100.0), (16, 100.0)], "capacity": [(8, 150.0), (16, 200.0)]}
  source, out = tmp_path / "rows.json", tmp_path / "plot.png"
  source.write_text(json.dumps(rows))
  assert plot_time_per_token.main(["--json", str(source), "--out", str(out)]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  source.write_text('{"not": "rows"}')
  assert plot_time_per_token.main(["--json", str(source), "--out", str(out)]) == 2


def test_vs_pytorch_without_torch_exits_2(monkeypatch, capsys):
  monkeypatch.setattr(vs_pytorch, "torch", None)
  assert vs_pytorch.main(["--num-experts", "4", "--tokens", "8"]) == 2
  assert "pip install torch" in capsys.readouterr().err


def test_vs_pytorch_main_writes_rows(tmp_path):
  pytest.importorskip("torch")
  path = tmp_path / "vs_pytorch.json"
  argv = ["--num-experts", "4", "--tokens", "32", "--repeats", "2", "--jax-dispatch", "capacity"]
  assert vs_pytorch.main(argv + ["--json", str(path)]) == 0
  rows = json.loads(path.read_text())
  assert [(r["framework"], r["layer"], r["optimizer"]) for r in rows] == [
    ("torch", "loop_over_experts", "adam_default"),
    ("torch", "loop_over_experts", "adam_fused"),
    ("torch", "dense_ffn", "adam_default"),
    ("torch", "dense_ffn", "adam_fused"),
    ("jax", "capacity", "optax_adam"),
    ("jax", "dense_ffn", "optax_adam"),
    ("torch", "every_expert", "adam_default"),
  ]
  for row in rows:
    assert VS_PYTORCH_KEYS <= row.keys()
    assert row["torch_loop_ratio"] == pytest.approx(rows[0]["seconds"] / row["seconds"])
    assert len(row["times"]) == row["repeats"] == 2


@pytest.mark.parametrize(
  "jax_dispatch, torch_layer",
  [("dropless_ragged_dot", "TorchLoopMoE"), ("every_expert", "TorchEveryExpertMoE")],
)
def test_torch_layers_compute_our_layers(jax_dispatch, torch_layer):
  """Same weights, same outputs: the timing compares the same math in both frameworks."""
  torch = pytest.importorskip("torch")
  num_experts, d_model, d_ff = 4, moe_layer.D_MODEL, moe_layer.D_FF
  config = MoEConfig(num_experts=num_experts, top_k=2, d_model=d_model, d_ff=d_ff)
  layer = MoEFeedForward(config, rngs=nnx.Rngs(0))
  x_TxD = jax.random.normal(jax.random.key(1), (24, d_model))
  params, apply = moe_layer.BUILDERS[jax_dispatch](layer)
  expected = np.asarray(jax.jit(apply)(params, x_TxD))

  module = getattr(vs_pytorch, torch_layer)(d_model, d_ff, num_experts, 2)
  vs_pytorch.load_jax_weights(module, params)
  with torch.no_grad():
    actual = module(torch.from_numpy(np.array(x_TxD))).numpy()
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


MOE_LAYER_KEYS = {
  "dispatch",
  "num_experts",
  "top_k",
  "seconds",
  "ratio_to_dense",
  "fwd_bwd_seconds",
  "fwd_bwd_ratio_to_dense",
}


def test_moe_layer_main_writes_rows(tmp_path):
  path = tmp_path / "moe_layer.json"
  argv = ["--num-experts", "4", "--tokens", "16", "--repeats", "1"]
  moe_layer.main(argv + ["--dispatch", "dense_ffn,capacity,balanced_batched_einsum", "--json", str(path)])
  rows = json.loads(path.read_text())
  assert [r["dispatch"] for r in rows] == [
    "dense_ffn",
    "capacity",
    "balanced_batched_einsum",
    "adam_update_experts",
    "adam_update_dense",
  ]
  for row in rows:
    assert MOE_LAYER_KEYS <= row.keys()
    assert (row["num_experts"], row["top_k"]) == (4, moe_layer.TOP_K)
  assert rows[0]["ratio_to_dense"] == rows[0]["fwd_bwd_ratio_to_dense"] == 1.0
  for row in rows[1:3]:
    assert row["ratio_to_dense"] == pytest.approx(row["seconds"] / rows[0]["seconds"])


def test_balanced_batched_einsum_runs_each_expert_on_its_dealt_rows():
  """Copy c of token t is row c*T + t of the dealt [T*k] rows; expert e owns rows e*C .. e*C+C-1."""
  num_experts, tokens = 4, 6  # C = T*k/E = 3 rows per expert
  config = MoEConfig(num_experts=num_experts, top_k=2, d_model=moe_layer.D_MODEL, d_ff=moe_layer.D_FF)
  layer = MoEFeedForward(config, rngs=nnx.Rngs(0))
  params, apply = moe_layer.BUILDERS["balanced_batched_einsum"](layer)
  x_TxD = np.asarray(jax.random.normal(jax.random.key(1), (tokens, moe_layer.D_MODEL)))
  w_in, b_in, w_out, b_out = (
    np.asarray(params[k]) for k in ("w_in_ExDxF", "b_in_ExF", "w_out_ExFxD", "b_out_ExD")
  )
  rows_per_expert = tokens * 2 // num_experts
  expected = np.zeros_like(x_TxD)
  for copy in range(2):
    for t in range(tokens):
      e = (copy * tokens + t) // rows_per_expert
      hidden = np.maximum(x_TxD[t] @ w_in[e] + b_in[e], 0.0)
      expected[t] += (hidden @ w_out[e] + b_out[e]) / 2
  np.testing.assert_allclose(np.asarray(jax.jit(apply)(params, x_TxD)), expected, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="divisible"):
    apply(params, x_TxD[:5])


@pytest.mark.parametrize("matmul", list(grouped_matmul.MATMULS))
def test_grouped_matmul_numpy_matmul_computes_the_einsum(matmul):
  a_shape, b_shape = grouped_matmul.operand_shapes(matmul, groups=3, rows=5, width=7)
  rng = np.random.default_rng(0)
  a = rng.standard_normal(a_shape, dtype=np.float32)
  b = rng.standard_normal(b_shape, dtype=np.float32)
  expected = np.einsum(grouped_matmul.MATMULS[matmul], a, b)
  np.testing.assert_allclose(grouped_matmul.numpy_matmul(matmul)(a, b), expected, rtol=1e-4, atol=1e-4)


def test_grouped_matmul_main_writes_rows(tmp_path):
  path = tmp_path / "grouped_matmul.json"
  grouped_matmul.main(["--num-experts", "2,4", "--tokens", "8", "--repeats", "1", "--json", str(path)])
  rows = json.loads(path.read_text())
  expected_cases = [
    (library, matmul, groups)
    for library in grouped_matmul.LIBRARIES
    for matmul in grouped_matmul.MATMULS
    for groups in (1, 2, 4)
  ]
  assert [(r["library"], r["matmul"], r["num_experts"]) for r in rows] == expected_cases
  for row in rows:
    assert row.keys() == {
      "library",
      "matmul",
      "num_experts",
      "rows_per_group",
      "seconds",
      "min_seconds",
      "repeats",
      "ratio_to_dense",
    }
    # Equal FLOPs: the groups share the k * tokens assignments, the dense case has its tokens.
    assert row["rows_per_group"] == (
      8 if row["num_experts"] == 1 else 8 * grouped_matmul.TOP_K // row["num_experts"]
    )
    if row["num_experts"] == 1:
      assert row["ratio_to_dense"] == 1.0


def test_grouped_matmul_rejects_uneven_groups():
  with pytest.raises(SystemExit):
    grouped_matmul.main(["--num-experts", "3", "--tokens", "8"])


def test_expert_parallel_main_writes_rows(tmp_path):
  from bench import expert_parallel

  path = tmp_path / "expert_parallel.json"
  argv = ["--tokens", "64", "--d_model", "8", "--d_ff", "16", "--experts", "8", "--repeats", "1"]
  argv += ["--meshes", "1x8,1x8:dropless"]
  assert expert_parallel.main(argv + ["--json", str(path)]) == 0
  written = json.loads(path.read_text())
  assert written["settings"]["experts"] == 8 and written["settings"]["devices"] == 8
  variants = [row["variant"] for row in written["rows"]]
  assert variants[:2] == ["single device", "gspmd (batch split, x8)"]
  assert variants[2:] == ["ep data=1 expert=8", "ep data=1 expert=8 dropless"]
  for row in written["rows"]:
    assert row["median_ms"] > 0 and row["min_ms"] <= row["median_ms"]
  ep = next(row for row in written["rows"] if row["variant"] == "ep data=1 expert=8")
  assert ep["all_to_all_forward_bytes"] > 0 and ep["capacity"] >= 1
