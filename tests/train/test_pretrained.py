"""The trainer on a pretrained diffusers VAE folder (`--config.vae.pretrained`).

The folders are written with numpy in diffusers' layout (tests/diffusers_vae_fixtures.py),
sized for configs/tiny.py: one level of 4 channels, 2 latent channels, no mid attention.
"""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import diffusers_vae_fixtures as fx
from train import config as config_lib
from train import loop
from train import step as step_lib
from train.models import vae as vae_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import tiny  # noqa: E402  pylint: disable=g-import-not-at-top

TINY_VAE = dict(in_channels=3, out_channels=3, block_out_channels=[4], layers_per_block=1,
                norm_num_groups=4, latent_channels=2, mid_block_add_attention=False,
                down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
                scaling_factor=0.5, shift_factor=0.1, force_upcast=False)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def tiny_config(folder, **overrides):
  c = tiny.get_config()
  c.vae.pretrained = str(folder)
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
  return fx.write_folder(tmp_path_factory.mktemp("vae") / "tiny_vae", TINY_VAE, seed=0)


def test_config_accepts_a_matching_pretrained_vae(vae_folder):
  config_lib.validate(tiny_config(vae_folder), num_devices=8)


@pytest.mark.parametrize("overrides,field,match", [
    ({"vae.latent_channels": 4}, "vae.latent_channels", "latent_channels=2"),
    ({"vae.channels": (4, 8)}, "vae.channels", "downsamples by 1"),
])
def test_pretrained_vae_that_does_not_fit_the_model_fails_before_compiling(
    vae_folder, overrides, field, match):
  with pytest.raises(config_lib.ConfigError, match=f"config.{field}:.*{match}"):
    config_lib.validate(tiny_config(vae_folder, **overrides), num_devices=8)


def test_bad_pretrained_paths_and_configs_name_the_field(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="config.vae.pretrained:.*does not exist"):
    config_lib.validate(tiny_config(tmp_path / "nope"), num_devices=8)
  bad = fx.write_folder(tmp_path / "gelu", dict(TINY_VAE, act_fn="gelu"))
  with pytest.raises(config_lib.ConfigError, match="config.vae.pretrained:.*'act_fn'"):
    config_lib.validate(tiny_config(bad), num_devices=8)
  gray = fx.write_folder(tmp_path / "gray", dict(TINY_VAE, in_channels=1, out_channels=1))
  with pytest.raises(config_lib.ConfigError, match="config.vae.pretrained:.*RGB"):
    config_lib.validate(tiny_config(gray), num_devices=8)


def test_models_use_the_pretrained_vae_and_its_latent_convention(vae_folder):
  (graphdef, params, rest), _ = loop.build_models(tiny_config(vae_folder))
  vae = nnx.merge(graphdef, params, rest)
  assert (vae.scaling_factor, vae.shift_factor) == (0.5, 0.1)
  want = fx.random_tensors(TINY_VAE, seed=0)["encoder.conv_in.weight"].transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(vae.encoder.conv_in.kernel.get_value(), want)
  x = jnp.tanh(jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3)))
  z = step_lib.encode_latents(vae, x, compute_dtype=jnp.float32)
  np.testing.assert_allclose(z, (vae.encode(x)[0] - 0.1) * 0.5, rtol=1e-6)
  # precision=bfloat16: bf16 parameters, unless the checkpoint asks for force_upcast.
  (_, p16, _), _ = loop.build_models(tiny_config(vae_folder), vae_dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}


def test_force_upcast_checkpoint_keeps_float32_under_bf16(tmp_path):
  folder = fx.write_folder(tmp_path / "up", dict(TINY_VAE, force_upcast=True))
  (_, p, _), _ = loop.build_models(tiny_config(folder), vae_dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.float32)}


@pytest.fixture(scope="module")
def reference_run(vae_folder, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pre_ref"))
  results = loop.train_and_evaluate(tiny_config(vae_folder), workdir, devices=jax.devices()[:2])
  return workdir, results


@pytest.mark.slow
def test_flow_trains_on_a_frozen_pretrained_vae_and_records_it(vae_folder, reference_run):
  workdir, results = reference_run
  assert not results["preempted"]
  assert results["skipped"] == {"vae": 0, "flow": 0}
  assert np.isfinite(results["flow"]["model"]["psnr"])
  # No vae stage: no VAE checkpoints; the flow stage ran all its steps.
  vae_dir = os.path.join(workdir, "vae")
  assert not (os.path.isdir(vae_dir) and any(d.isdigit() for d in os.listdir(vae_dir)))
  assert os.path.isdir(os.path.join(workdir, "flow", str(tiny.get_config().flow.steps)))
  # Frozen: the VAE parameters after training are the file's.
  (_, loaded, _), _ = loop.build_models(tiny_config(vae_folder))
  for a, b in zip(leaves(loaded), leaves(results["params"]["vae"]), strict=True):
    np.testing.assert_array_equal(a, b)
  # Provenance: path + sha256 of the weights in the workdir.
  with open(os.path.join(workdir, "pretrained_vae.json")) as fh:
    record = json.load(fh)
  weights = os.path.join(vae_folder, vae_lib.WEIGHTS_NAME)
  with open(weights, "rb") as fh:
    assert record["sha256"] == hashlib.sha256(fh.read()).hexdigest()
  assert record["path"] == os.path.abspath(vae_folder)
  assert record["config"]["scaling_factor"] == 0.5


@pytest.mark.slow
def test_resume_on_a_pretrained_vae_is_bit_identical(vae_folder, reference_run, tmp_path):
  _, ref = reference_run
  cfg = tiny_config(vae_folder)
  r1 = loop.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:2],
                               stop_after={"flow": 2})
  assert r1["preempted"]
  r2 = loop.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:2])
  assert not r2["preempted"]
  for a, b in zip(leaves(ref["params"]["model"]), leaves(r2["params"]["model"]), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_resume_against_other_vae_weights_or_a_trained_vae_fails(vae_folder, reference_run,
                                                                tmp_path):
  workdir, _ = reference_run
  other = fx.write_folder(tmp_path / "other", TINY_VAE, seed=1)  # same config, new weights
  with pytest.raises(config_lib.ConfigError, match="config.vae.pretrained:.*sha256"):
    loop.train_and_evaluate(tiny_config(other), workdir, devices=jax.devices()[:2])
  with pytest.raises(config_lib.ConfigError, match="config.vae.pretrained: is ''"):
    loop.train_and_evaluate(tiny.get_config(), workdir, devices=jax.devices()[:2])
  trained = tmp_path / "trained"
  (trained / "vae" / "4").mkdir(parents=True)  # a run that trained its own VAE
  with pytest.raises(config_lib.ConfigError, match="trained its own VAE"):
    loop.train_and_evaluate(tiny_config(vae_folder), str(trained), devices=jax.devices()[:2])


@pytest.mark.slow
def test_cli_trains_a_flow_model_on_a_pretrained_vae_folder(vae_folder, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "train", "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--config.vae.pretrained={vae_folder}", "--verbosity=0"]  # INFO: the sha256 line
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout + proc.stderr
  assert "Validation" in out and "sha256" in out
  assert os.path.isfile(os.path.join(workdir, "pretrained_vae.json"))
  assert os.path.isdir(os.path.join(workdir, "flow", str(tiny.get_config().flow.steps)))
  # A VAE that does not fit the model: exit 2 with the field, before any compile.
  proc = subprocess.run(cmd[:4] + [f"--workdir={tmp_path / 'bad'}", cmd[5],
                                   "--config.vae.latent_channels=16"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2
  assert "config.vae.latent_channels" in proc.stderr and "latent_channels=2" in proc.stderr
