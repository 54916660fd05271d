"""The memory plan: figures from the compiled step and the arrays, the fit check, configs/pod.py,
plans compiled for TPU slices and H100 hosts (`compile_only`: in a child pytest with the
compile-only plugins, tests/conftest.py), FLOPs per step and the chip tables."""

import importlib.util
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import config as config_lib
from train import loop
from train import memory
from train import sharding
from train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import pod  # noqa: E402  pylint: disable=g-import-not-at-top


def _toy_plan(fsdp):
  mesh = sharding.make_mesh(fsdp=fsdp)
  params = {"w": jnp.ones((256, 64), jnp.float32), "b": jnp.zeros((64,), jnp.float32)}
  tx = optax.adam(1e-3)
  state = step_lib.place_state(step_lib.init_state(params, tx), mesh)
  batch = step_lib.shard_batch({"x": np.ones((16, 256), np.float32)}, mesh)

  def loss(p, b, frozen):
    del frozen
    return jnp.mean(jnp.square(b["x"] @ p["w"] + p["b"])), {}

  train_step = step_lib.make_train_step(loss, tx, mesh)
  compiled = train_step.lower(state, batch, {}, jax.random.PRNGKey(0)).compile()
  return memory.plan(compiled, state), state, batch


def test_plan_figures_come_from_the_compiled_step_and_the_arrays():
  p1, state1, _ = _toy_plan(1)
  p4, state4, batch4 = _toy_plan(4)
  assert p1.params == 256 * 64 * 4 + 64 * 4  # nothing sharded at fsdp=1
  assert p4.params == 256 * 64 * 4 // 4 + 64 * 4  # w split over 4, b (64 < 1024) whole
  assert p4.opt_state == sharding.per_device_bytes(state4.opt_state) < p1.opt_state
  # XLA's per-device argument bytes are the state's and the batch shard's (the
  # key is unused without make_inputs: jit drops it).
  inputs = sharding.per_device_bytes(state4) + sharding.per_device_bytes(batch4)
  assert p4.arguments == inputs
  assert p1.arguments - p4.arguments == (p1.params + p1.opt_state) - (p4.params + p4.opt_state)
  assert p4.temp > 0 and p4.peak == p4.arguments + p4.outputs - p4.alias + p4.temp
  line = p4.line(name="stage flow")
  assert line.startswith("memory plan (stage flow): per device ") and "\n" not in line
  assert "not checked" in line
  assert p4.num_params == 256 * 64 + 64 and p4.params_text() == "16.4 K parameters"


def test_plan_counts_a_frozen_base_apart_from_the_trained_params():
  """LoRA: the step's `frozen['base']` (here abstract) is counted, and named, as a frozen base."""
  mesh = sharding.make_mesh(fsdp=1)
  params = {"lora_A": jnp.ones((64, 4)), "lora_B": jnp.zeros((4, 64))}
  base = {"kernel": jax.ShapeDtypeStruct((3000, 1000), jnp.bfloat16),
          "scale": jax.ShapeDtypeStruct((1000,), jnp.bfloat16)}
  tx = optax.adam(1e-3)
  state = step_lib.place_state(step_lib.init_state(params, tx), mesh)
  train_step = step_lib.make_train_step(
      lambda p, b, frozen: (jnp.sum(b["x"] @ p["lora_A"] @ p["lora_B"]), {}), tx, mesh)
  compiled = train_step.lower(state, step_lib.shard_batch({"x": np.ones((8, 64), np.float32)},
                                                          mesh), {}, jax.random.PRNGKey(0)).compile()
  plan = memory.plan(compiled, state, frozen=base)
  assert (plan.num_params, plan.frozen_params) == (512, 3_001_000)
  assert plan.params_text() == "512 parameters trained (LoRA) on a frozen 3.0 M base"
  assert memory.plan(compiled, state).params_text() == "512 parameters"


def test_fit_check_names_the_fields_to_change():
  plan = memory.MemoryPlan(params=2**30, opt_state=2**31, arguments=3 * 2**30,
                           outputs=3 * 2**30, temp=10 * 2**30, alias=0)
  memory.check_fit(plan, limit=None)  # the device does not say: nothing to check
  memory.check_fit(plan, limit=plan.peak)
  with pytest.raises(memory.MemoryPlanError) as e:
    memory.check_fit(plan, limit=8 * 2**30, name="stage flow")
  msg = str(e.value)
  for field in memory.FIELDS:
    assert f"config.{field}" in msg, msg
  assert "16.00 GiB" in msg and "8.00 GiB" in msg and "per device" in msg
  assert isinstance(e.value, config_lib.ConfigError)  # the CLI prints it and exits 2


def test_device_limit():
  class Dev:
    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      return self.stats

  assert memory.device_limit(Dev({"bytes_limit": 80 * 2**30, "bytes_in_use": 0})) == 80 * 2**30
  assert memory.device_limit(Dev(None)) is None  # the CPU
  assert memory.device_limit(jax.devices()[0]) is None


@pytest.mark.slow
def test_pod_config_step_compiles_and_its_plan_scales():
  """configs/pod.py's flow step (depth 24 -> 2, everything else as shipped: hidden
  1024, 512 px FLUX-layout latents, bf16, fsdp=8, batch 64) lowers and compiles on
  8 devices; its params and optimizer state per device are 1/8 of fsdp=1's (to
  within the replicated biases), and XLA's per-device arguments are exactly the
  sharded state + batch shard + frozen VAE + key."""
  cfg = pod.get_config()
  assert (cfg.mesh.fsdp, cfg.precision, cfg.vae.latent_channels) == (8, "bfloat16", 16)
  cfg.dit.depth = 2
  plan = loop.memory_plans(cfg, stages=("flow",))["flow"]
  progs = loop.build_programs(cfg, sharding.make_mesh(fsdp=8), abstract=True)
  full = {name: sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                    for x in jax.tree.leaves(tree))
          for name, tree in (("params", progs.flow_state0.params),
                             ("opt", progs.flow_state0.opt_state), ("vae", progs.vae[1]))}
  assert full["params"] > 25e6 * 4  # depth 2 of the ~0.46 B model: > 25 M params
  for got, whole in ((plan.params, full["params"]), (plan.opt_state, full["opt"])):
    assert 0.99 * whole / 8 < got < 1.01 * whole / 8, (got, whole)
  hr, lr = cfg.data.hr_size, cfg.data.hr_size // cfg.data.scale
  batch_shard = (cfg.batch_size // 8) * (hr * hr + lr * lr) * 3 * 4
  counters = 3 * 4 + 8  # step, skipped, consecutive_skips; the key
  assert abs(plan.arguments - (plan.params + plan.opt_state + full["vae"] + batch_shard
                               + counters)) < 1024
  assert plan.alias > 0.99 * (plan.params + plan.opt_state)  # the state is donated
  print(plan.line(name="stage flow, pod depth 2"))


# configs/tiny.py's data and VAE with a DiT of 7.6 M parameters (31 MB float32), large
# next to its activations (32 px images, 16 tokens), so that a step that held the whole
# model on a chip would show in its temporaries; every leaf split over fsdp (params per
# chip exactly 1/fsdp).
_SMALL_DIT = {"data.hr_size": 16, "mesh.min_shard_size": 0, "precision": "bfloat16",
              "dit.hidden_size": 256, "dit.num_heads": 4, "dit.depth": 8, "dit.remat": "full",
              "vae.steps": 0}
# configs/flux_tiny.py's FLUX grown to ~20 M parameters in 24 blocks (every dimension
# divisible by 8): one gathered block is a small part of the model, as in FLUX.1, and the
# activations of 32 px images are small beside the parameters (at 12 blocks they are not:
# temporaries 0.82 x the float32 model, 0.45 x at 24; a whole-model gather needs 2 x).
_SMALL_FLUX = {"mesh.min_shard_size": 0, "precision": "bfloat16", "flux.num_layers": 8,
               "flux.num_single_layers": 16, "flux.attention_head_dim": 32,
               "flux.num_attention_heads": 6, "flux.axes_dims_rope": (8, 12, 12)}


def _load_config(path: str, overrides: dict):
  """`get_config()` of the config file at `path` (relative to the repo), with `overrides`
  ({'mesh.fsdp': 8, ...}) set field by field."""
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3],
                                                os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for field, value in overrides.items():
    *parents, leaf = field.split(".")
    node = cfg
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return cfg


# Configs compiled for a TPU slice (v5e:2x2) in CI: (config file, overrides), with fsdp 4,
# every parameter split (mesh.min_shard_size 0), float32 master weights of more than 30 MB
# (so that a whole-model temporary would show).
TPU_PLAN_CONFIGS = [
    pytest.param("configs/tiny.py", {"batch_size": 4, "mesh.fsdp": 4, **_SMALL_DIT}, id="tiny"),
    pytest.param("configs/flux_tiny.py", {"batch_size": 4, "mesh.fsdp": 4, **_SMALL_FLUX},
                 id="flux_tiny"),
]


@pytest.mark.compile_only
@pytest.mark.parametrize("config_file, overrides", TPU_PLAN_CONFIGS)
def test_small_config_compiles_for_a_tpu_topology_without_holding_the_whole_model(
    plan_plugins, config_file, overrides):
  """The flow step compiled by the TPU compiler (libtpu's compile-only client, no
  TPU) for v5e:2x2 with fsdp=4: params per chip are exactly 1/4 of the model's,
  and neither the temporaries nor the compiler's peak come near the float32 model:
  each block is gathered (in bf16) only inside the scan body."""
  del plan_plugins  # on the path of the child pytest this runs in (tests/conftest.py)
  devices = memory.topology_devices("v5e:2x2")
  assert len(devices) == 4 and devices[0].platform == "tpu"
  cfg = _load_config(config_file, overrides)
  assert cfg.mesh.fsdp == 4
  plan = loop.memory_plans(cfg, devices, stages=("flow",))["flow"]
  mesh = sharding.make_mesh(fsdp=4, devices=devices)
  progs = loop.build_programs(cfg, mesh, abstract=True)
  whole = sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
              for x in jax.tree.leaves(progs.flow_state0.params))
  assert plan.num_params * 4 == whole > 30e6  # float32; tiny's small DiT: 7.6 M, FLUX 20 M
  assert plan.params * 4 == whole  # exactly 1/fsdp per chip
  # Adam's two moments in the same layout (+ its int32 step counters, replicated).
  assert 2 * plan.params <= plan.opt_state < 2 * plan.params + 64
  assert plan.compiler_peak > 0  # the TPU compiler's own peak
  # A whole-model gather (the step before per-layer fsdp) needs >= whole (the
  # gathered f32 params) + whole (their local gradient) in temporaries; per layer:
  # the gradient shard (whole / 4), one bf16 block and Adam's update.
  assert plan.temp < 0.75 * whole, (plan.temp, whole)
  assert plan.alias > 0.9 * (plan.params + plan.opt_state)  # the state is donated
  assert plan.compiler_peak < plan.arguments + whole, (plan, whole)
  assert memory.device_limit(devices[0]) == 16 * 2**30  # v5e's HBM, by device kind
  assert memory.peak_flops_per_second(devices[0]) == 197e12
  print(plan.line(name="stage flow, v5e:2x2"))


@pytest.mark.compile_only
def test_out_of_hbm_compile_is_a_fit_error_naming_the_fields(plan_plugins):
  """The TPU compiler refuses a program above the chip's HBM (20 GiB of temporaries on a
  16 GiB v5e chip); `compile_step` turns that into the fit error, not a crash."""
  del plan_plugins
  devices = memory.topology_devices("v5e:2x2")
  mesh = jax.sharding.Mesh(np.array(devices), ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  big = jax.jit(lambda x: jnp.broadcast_to(x, (5 * 2**30,)) * 2.0, out_shardings=rep)
  with pytest.raises(memory.MemoryPlanError) as e:
    memory.compile_step(big.lower(jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)),
                        name="stage flow")
  msg = str(e.value)
  assert "RESOURCE_EXHAUSTED" in msg and "stage flow" in msg
  for field in memory.FIELDS:
    assert f"config.{field}" in msg, msg


@pytest.mark.compile_only
def test_unknown_topology_names_it(plan_plugins):
  del plan_plugins  # libtpu itself rejects the name
  with pytest.raises(ValueError, match="v9z:1x1") as e:
    memory.topology_devices("v9z:1x1")
  assert "h100:N" in str(e.value)  # and the GPU spellings are named


@pytest.mark.parametrize("name", ["h100:0", "h100:9", "h100:8x", "h100:x8", "h100:2x8x1",
                                  "h100:", "h100:eight"])
def test_unknown_h100_spelling_names_the_topology(name):
  """Refused before any plugin is loaded (this process has none)."""
  with pytest.raises(ValueError) as e:
    memory.topology_devices(name)
  msg = str(e.value)
  assert repr(name) in msg and "'h100:N'" in msg and "'h100:HxN'" in msg, msg
  with pytest.raises(ValueError, match="num_slices=2 is for TPU slices.*'h100:2x8'"):
    memory.topology_devices("h100:8", num_slices=2)


# Configs compiled for one 8-GPU H100 host in CI: (config file, overrides). Each must
# split every parameter over fsdp=8 (mesh.min_shard_size 0, a dimension divisible by 8).
H100_PLAN_CONFIGS = [
    pytest.param("configs/tiny.py", {"batch_size": 8, "mesh.fsdp": 8, **_SMALL_DIT}, id="tiny"),
    pytest.param("configs/flux_tiny.py", {"batch_size": 8, "mesh.fsdp": 8, **_SMALL_FLUX},
                 id="flux_tiny"),
]


@pytest.mark.compile_only
@pytest.mark.parametrize("config_file, overrides", H100_PLAN_CONFIGS)
def test_config_compiles_for_an_h100_host(plan_plugins, config_file, overrides):
  """The flow step compiled by XLA:GPU with no GPU (deviceless AOT) for one host of 8 H100s
  with fsdp=8: figures are per GPU (params exactly 1/8 of the model's), no temporary holds
  the whole model, the state is donated, and the peak is under the 59.36 GiB JAX's
  allocator takes of an H100 by default."""
  del plan_plugins
  devices = memory.topology_devices("h100:8")
  assert len(devices) == 8 and {d.platform for d in devices} == {"gpu"}
  assert devices[0].device_kind == "NVIDIA H100 80GB HBM3" and memory.is_compile_only(devices[0])
  cfg = _load_config(config_file, overrides)
  assert cfg.mesh.fsdp == 8
  plan = loop.memory_plans(cfg, devices, stages=("flow",))["flow"]
  progs = loop.build_programs(cfg, sharding.make_mesh(fsdp=8, devices=devices), abstract=True)
  whole = sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
              for x in jax.tree.leaves(progs.flow_state0.params))
  assert plan.params * 8 == whole  # exactly 1/fsdp per GPU
  assert 2 * plan.params <= plan.opt_state < 2 * plan.params + 64  # Adam's two moments
  assert plan.temp < 0.75 * whole, (plan.temp, whole)  # no whole-model gather
  assert plan.alias > 0.9 * (plan.params + plan.opt_state)  # the state is donated
  # XLA:GPU's own peak is not used: it is below what the runtime allocates.
  assert plan.compiler_peak == 0
  assert plan.peak == plan.arguments + plan.outputs - plan.alias + plan.temp
  limit = memory.device_limit(devices[0])
  assert limit == int(0.75 * 84978434048)  # 59.36 GiB
  assert 0 < plan.peak < limit
  assert plan.flops > 0
  assert memory.peak_flops_per_second(devices[0]) == 989.4e12
  print(plan.line(name=f"stage flow, {config_file}, h100:8", limit=limit))


@pytest.mark.compile_only
def test_two_h100_hosts_are_one_mesh(plan_plugins):
  """h100:2x8: 16 GPUs, 8 per process (host); a plan over them is per GPU."""
  del plan_plugins
  devices = memory.topology_devices("h100:2x8")
  assert len(devices) == 16
  assert sorted({d.process_index for d in devices}) == [0, 1]
  assert all(sum(d.process_index == p for d in devices) == 8 for p in (0, 1))


@pytest.mark.compile_only
def test_xla_gpu_compiles_past_the_gpu_memory_and_the_fit_check_refuses_it(plan_plugins,
                                                                          monkeypatch):
  """XLA:GPU, unlike the TPU compiler, does not refuse a program larger than the GPU
  (here 20 GiB of output per GPU against a 0.1 x 79.14 GiB = 7.9 GiB allocator): it compiles,
  and `check_fit` against `device_limit` is the refusal, naming the fields and the memory
  fraction."""
  del plan_plugins
  monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.1")
  devices = memory.topology_devices("h100:8")
  mesh = jax.sharding.Mesh(np.array(devices), ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  big = jax.jit(lambda x: jnp.broadcast_to(x, (5 * 2**30,)) * 2.0, out_shardings=rep)
  x = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  compiled = memory.compile_step(big.lower(x), name="stage flow",
                                 compiler_options=memory.compiler_options(devices))
  state = types.SimpleNamespace(params={"x": x}, opt_state={})
  plan = memory.plan(compiled, state)
  assert plan.outputs == 20 * 2**30 and plan.params == 4
  limit = memory.device_limit(devices[0])
  assert limit == int(0.1 * 84978434048)
  with pytest.raises(memory.MemoryPlanError) as e:
    memory.check_fit(plan, limit=limit, name="stage flow",
                     note=memory.limit_note(devices[0]))
  msg = str(e.value)
  assert "stage flow" in msg and "20.00 GiB" in msg and "7.91 GiB" in msg, msg
  assert "XLA_CLIENT_MEM_FRACTION" in msg and "10% of the 79.14 GiB HBM" in msg, msg
  for field in memory.FIELDS:
    assert f"config.{field}" in msg, msg


@pytest.mark.slow
@pytest.mark.compile_only
def test_memory_plan_script_for_an_h100_host(plan_plugins, tmp_path):
  """scripts/memory_plan.py --topology=h100:8, as a user runs it (it sets JAX_PLATFORMS=cpu
  itself): the devices and their limit, the plan line, parameters, FLOPs per step with the
  time they take at the H100's peak, and a step that does not fit the allocator (given
  1e-4 of the GPU: 8.1 MiB) exits 2 with the fit error."""
  env = dict(os.environ, XLA_CLIENT_MEM_FRACTION="0.0001")
  env.pop("JAX_PLATFORMS", None)
  overrides = [f"--config.{k}={v}" for k, v in H100_PLAN_CONFIGS[0].values[1].items()]
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "memory_plan.py"),
       "--config=" + os.path.join(ROOT, "configs", "tiny.py"), "--topology=h100:8",
       "--stages=flow", *overrides],
      cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
  del plan_plugins
  out = result.stdout
  assert result.returncode == 2, (out, result.stderr[-3000:])
  assert "8 NVIDIA H100 80GB HBM3 devices (h100:8), 0.01 GiB each (0.01% of the 79.14 GiB" in out
  assert "memory plan (stage flow): per device " in out
  assert "M parameters, peak " in out
  assert re.search(r"stage flow: [\d.]+ [MGT]?FLOP per step per device .* at the chip's "
                   r"peak 989 TFLOP/s bf16", out), out
  err = result.stderr
  assert "error: memory plan (stage flow)" in err and "config.batch_size" in err, err
  assert "Traceback" not in err and "TPU" not in err, err


def test_step_flops_match_xla_and_count_scans_per_step():
  """`step_flops` equals XLA's own count (HloCostAnalysis, loop-free programs) for dots and
  for convolutions with padding, strides, groups and their transposes; a scan body counts
  `length` times (XLA counts it once); remat's recomputation counts; under shard_map the
  shapes are one device's, outside it the global count is split over the devices."""
  def conv(x, k, stride, padding, groups):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)
  x = jnp.ones((2, 16, 16, 8))
  for stride, padding, groups in ((1, "VALID", 1), (2, "SAME", 1), (1, "SAME", 2),
                                  (2, ((2, 1), (2, 1)), 1)):
    k = jnp.ones((3, 3, 8 // groups, 6))
    y = jax.eval_shape(lambda x, k: conv(x, k, stride, padding, groups), x, k)
    ct = jnp.ones(y.shape)
    programs = (
        (lambda x, k: conv(x, k, stride, padding, groups), (x, k)),
        # The input and kernel gradients: lhs-dilated and batch-grouped convolutions.
        (lambda x, k, ct: jax.linear_transpose(
            lambda x: conv(x, k, stride, padding, groups), x)(ct), (x, k, ct)),
        (lambda x, k, ct: jax.linear_transpose(
            lambda k: conv(x, k, stride, padding, groups), k)(ct), (x, k, ct)),
        (lambda a, b: jnp.einsum("bij,bjk->bik", a, b),
         (jnp.ones((3, 5, 7)), jnp.ones((3, 7, 2)))))
    for fn, args in programs:
      f = jax.jit(fn)
      assert memory.step_flops(f.trace(*args).jaxpr, num_devices=1) == (
          f.lower(*args).cost_analysis()["flops"])

  def layers(x, w):
    return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()
  x, w = jnp.ones((64, 128)), jnp.ones((10, 128, 128))
  one = 2 * 64 * 128 * 128
  flops = lambda fn: memory.step_flops(jax.jit(fn).trace(x, w).jaxpr, num_devices=1) / one
  assert jax.jit(layers).lower(x, w).cost_analysis()["flops"] < 1.01 * one  # XLA: once
  assert flops(layers) == 10
  assert flops(jax.grad(layers, argnums=(0, 1))) == 30  # forward, d(input), d(weights)
  assert flops(jax.grad(jax.checkpoint(layers), argnums=(0, 1))) == 40  # + the recompute

  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("x",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  a = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=split)
  b = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=rep)
  matmul = lambda a, b: a @ b
  per_device = jax.jit(jax.shard_map(matmul, mesh=mesh, in_specs=(jax.P("x"), jax.P()),
                                     out_specs=jax.P("x")))
  for f in (jax.jit(matmul), per_device):
    assert memory.step_flops(f.trace(a, b).jaxpr, num_devices=len(devices)) == (
        2 * 1024 * 512 * 256 / len(devices))


def test_peak_flops_and_gpu_memory_by_device_kind(monkeypatch):
  """The chip tables: peak bf16 FLOP/s and HBM by device kind; the H100's HBM is its
  spec's device_memory_size, and JAX's allocator takes 0.75 of it unless
  XLA_CLIENT_MEM_FRACTION (or the older XLA_PYTHON_CLIENT_MEM_FRACTION) says otherwise."""
  class CompileOnly:
    platform = "gpu"
    device_kind = "NVIDIA H100 80GB HBM3"

    def memory_stats(self):
      raise RuntimeError("MemoryStats is only supported for addressable PjRt devices.")

  with open(os.path.join(ROOT, "train", "gpu_specs", "h100_sxm.txtpb"), encoding="utf-8") as f:
    spec = f.read()
  assert f"device_memory_size: {memory.HBM_BYTES['NVIDIA H100 80GB HBM3']}\n" in spec
  assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in spec
  for var in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
    monkeypatch.delenv(var, raising=False)
  gpu = CompileOnly()
  assert memory.device_limit(gpu) == int(0.75 * 84978434048)
  assert "75% of the 79.14 GiB HBM" in memory.limit_note(gpu)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  assert memory.device_limit(gpu) == int(0.9 * 84978434048)
  monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "1.5")
  with pytest.raises(ValueError, match="XLA_CLIENT_MEM_FRACTION='1.5'"):
    memory.device_limit(gpu)
  assert memory.limit_note(jax.devices()[0]) == ""
  assert memory.peak_flops_per_second(gpu) == 989.4e12
  for kind, tflops in (("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5", 459),
                       ("TPU v6 lite", 918), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
                       ("NVIDIA A100-SXM4-80GB", 312)):  # the longest matching prefix wins
    assert memory.peak_flops_per_second(types.SimpleNamespace(device_kind=kind)) == tflops * 1e12
  assert memory.peak_flops_per_second(types.SimpleNamespace(
      device_kind="NVIDIA GeForce RTX 4090")) is None
  assert memory.peak_flops_per_second(jax.devices()[0]) is None  # the CPU
  assert memory.peak_flops_per_second() is None  # the first device: this CPU
  assert memory.compiler_options(jax.devices()) == {}  # real devices: XLA's defaults
