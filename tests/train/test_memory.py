"""The memory plan: figures from the compiled step and the arrays, the fit check, configs/pod.py."""

import os
import sys

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


def _small_pod_config():
  """configs/tiny.py's data and VAE with a DiT of 7.6 M parameters (31 MB float32),
  large next to its activations (32 px images, 16 tokens), so that a step that held
  the whole model on a chip would show in its temporaries."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  cfg = tiny.get_config()
  cfg.batch_size = 4
  cfg.data.hr_size = 16
  cfg.mesh.fsdp = 4
  cfg.mesh.min_shard_size = 0  # every leaf split, so params per chip are exactly 1/4
  cfg.precision = "bfloat16"
  cfg.dit.hidden_size = 256
  cfg.dit.num_heads = 4
  cfg.dit.depth = 8
  cfg.dit.remat = "full"
  cfg.vae.steps = 0
  return cfg


def test_small_config_compiles_for_a_tpu_topology_without_holding_the_whole_model():
  """The flow step compiled by the TPU compiler (libtpu's compile-only client, no
  TPU) for v5e:2x2 with fsdp=4: params per chip are exactly 1/4 of the model's,
  and neither the temporaries nor the compiler's peak come near the float32 model:
  each block is gathered (in bf16) only inside the scan body."""
  devices = memory.topology_devices("v5e:2x2")
  assert len(devices) == 4 and devices[0].platform == "tpu"
  cfg = _small_pod_config()
  plan = loop.memory_plans(cfg, devices, stages=("flow",))["flow"]
  mesh = sharding.make_mesh(fsdp=4, devices=devices)
  progs = loop.build_programs(cfg, mesh, abstract=True)
  whole = sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
              for x in jax.tree.leaves(progs.flow_state0.params))
  assert plan.num_params * 4 == whole > 30e6  # 7.6 M float32 parameters
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
  print(plan.line(name="stage flow, v5e:2x2"))


def test_out_of_hbm_compile_is_a_fit_error_naming_the_fields():
  """The TPU compiler refuses a program above the chip's HBM (20 GiB of temporaries on a
  16 GiB v5e chip); `compile_step` turns that into the fit error, not a crash."""
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


def test_unknown_topology_names_it():
  with pytest.raises(ValueError, match="v9z:1x1"):
    memory.topology_devices("v9z:1x1")
