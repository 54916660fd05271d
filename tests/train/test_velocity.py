"""The velocity-model interface (train/velocity.py) and FLUX in the trainer.

FLUX runs through the same step, loop, sampler and export as the DiT; these
tests pin what is FLUX-specific against diffusers itself: Kontext's
conditioning (packing, ids, the first N tokens), the shifted time grid, the
exported folder, and the provenance of the weights a run starts from.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssim_jax import flow
from train import config as config_lib
from train import loop
from train import step as step_lib
from train import velocity
from train.models import flux

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import flux_tiny  # noqa: E402  pylint: disable=g-import-not-at-top
import optional  # noqa: E402  (tests/ is on the path)

torch = optional.require("torch")
diffusers = optional.require("diffusers")

# A small diffusers FLUX of flux_tiny's in_channels (4 x the retina VAE's 8 latent
# channels), with other widths than flux_tiny's own: they come from its config.json.
SMALL = dict(patch_size=1, in_channels=32, num_layers=1, num_single_layers=2,
             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
             pooled_projection_dim=6, guidance_embeds=True, axes_dims_rope=(2, 2, 4))


def _write_flux(folder, seed=0, **over):
  torch.manual_seed(seed)
  model = diffusers.FluxTransformer2DModel(**{**SMALL, **over}).eval()
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope="module")
def small_flux(tmp_path_factory):
  folder = tmp_path_factory.mktemp("small_flux")
  return str(folder), _write_flux(folder)


def _config(**flux_fields):
  c = flux_tiny.get_config()
  for k, v in flux_fields.items():
    c.flux[k] = v
  return c


def test_kontext_velocity_is_diffusers_pipeline_arithmetic(small_flux):
  """`FluxVelocity.velocity` = what FluxKontextPipeline does around the transformer:
  `_pack_latents` of the noisy target and of the condition latents, their ids
  (`img_ids[..., 0] = 1` for the condition), [target, condition] tokens in, the
  first N tokens out, `_unpack_latents`."""
  from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
  folder, ref = small_flux
  cfg = _config(pretrained=folder, prompt_length=5)
  model = velocity.for_config(cfg)
  graphdef, params, _ = model.build()
  rng = np.random.default_rng(0)
  b, h, w, c = 2, 4, 6, 8
  x_t = rng.normal(size=(b, h, w, c)).astype(np.float32)
  cond_lat = rng.normal(size=(b, h, w, c)).astype(np.float32)
  t = np.array([0.2, 0.9], np.float32)
  prompt = rng.normal(size=(5, 12)).astype(np.float32)
  pooled = rng.normal(size=(6,)).astype(np.float32)
  cond = {"tokens": flow.patchify(jnp.asarray(cond_lat), patch_size=2, patch_order="cpq"),
          "txt": jnp.broadcast_to(prompt, (b, 5, 12)), "pooled": jnp.broadcast_to(pooled, (b, 6))}
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(model.velocity(graphdef, params, jnp.asarray(x_t), jnp.asarray(t), cond,
                                     compute_dtype=jnp.float32))
  nchw = lambda a: torch.tensor(a.transpose(0, 3, 1, 2))
  packed = FluxPipeline._pack_latents(nchw(x_t), b, c, h, w)
  packed_cond = FluxPipeline._pack_latents(nchw(cond_lat), b, c, h, w)
  ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
  cond_ids = ids.clone()
  cond_ids[..., 0] = 1
  with torch.no_grad():
    out = ref(hidden_states=torch.cat([packed, packed_cond], 1),
              encoder_hidden_states=torch.tensor(np.broadcast_to(prompt, (b, 5, 12)).copy()),
              pooled_projections=torch.tensor(np.broadcast_to(pooled, (b, 6)).copy()),
              timestep=torch.tensor(t), img_ids=torch.cat([ids, cond_ids]),
              txt_ids=torch.zeros(5, 3), guidance=torch.full((b,), 3.5)).sample
  theirs = FluxPipeline._unpack_latents(out[:, :packed.shape[1]], h * 8, w * 8, 8).numpy()
  theirs = theirs.transpose(0, 2, 3, 1)
  assert np.abs(theirs).max() > 0.1
  np.testing.assert_allclose(ours, theirs, atol=2e-5 * np.abs(theirs).max())


def test_sampler_time_grid_is_flux_scheduler_with_calculate_shift():
  from diffusers import FlowMatchEulerDiscreteScheduler
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift
  cfg = _config()
  n, tokens = 28, 1024
  sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                          max_shift=1.15, base_image_seq_len=256,
                                          max_image_seq_len=4096, shift=3.0)
  mu = calculate_shift(tokens)
  sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
  assert step_lib.shift_mu(cfg, tokens) == pytest.approx(mu)
  np.testing.assert_allclose(step_lib.sample_times(cfg, n, tokens), sched.sigmas.numpy(),
                             rtol=1e-6, atol=1e-7)
  # Training times are shifted by the same map (t -> e^mu t / (e^mu t + 1 - t)).
  u = jnp.linspace(0.01, 0.99, 9)
  np.testing.assert_allclose(np.asarray(step_lib.time_shift(u, mu)),
                             sched.time_shift(mu, 1.0, torch.tensor(np.asarray(u))).numpy(),
                             rtol=1e-6)
  cfg.t_shift = "none"  # the DiT's default: the uniform grid, unshifted draws
  np.testing.assert_array_equal(step_lib.sample_times(cfg, 4, tokens),
                                np.float32([1, 0.75, 0.5, 0.25, 0]))


def test_training_time_draws_follow_the_configured_density():
  key = jax.random.PRNGKey(0)
  u = np.asarray(step_lib.sample_t(key, 20000, sampling="uniform"))
  assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
  ln = np.asarray(step_lib.sample_t(key, 20000, mean=0.5, std=0.8))
  logit = np.log(ln / (1 - ln))
  assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
  shifted = np.asarray(step_lib.sample_t(key, 20000, mean=0.5, std=0.8, mu=0.7))
  np.testing.assert_allclose(shifted, np.e ** 0.7 * ln / (np.e ** 0.7 * ln + 1 - ln), rtol=1e-5)


def test_decoded_ssim_gradient_through_flux_is_finite():
  """The flow loss with only the decoded SSIM term (every image weighted: max_t = 1),
  through the tiny FLUX and the shipped VAE: finite, non-zero gradients."""
  cfg = _config()
  cfg.mse_loss_weight, cfg.pixel_loss_weight, cfg.ssim_loss_weight = 0.0, 0.0, 1.0
  cfg.ssim_loss_max_t = 1.0
  cfg = config_lib.resolve(cfg)
  config_lib.validate(cfg, num_devices=1)
  vae, (graphdef, params, _) = loop.build_models(cfg)
  model = velocity.for_config(cfg)
  loss_fn = step_lib.make_flow_loss(cfg, model, graphdef, vae[0], vae[2],
                                    compute_dtype=jnp.float32)
  rng = np.random.default_rng(0)
  hr = cfg.data.hr_size
  lat = (hr // 4, hr // 4, 8)
  batch = {"highres": jnp.asarray(rng.uniform(-1, 1, (2, hr, hr, 3)), jnp.float32),
           "lowres": jnp.asarray(rng.uniform(-1, 1, (2, hr // 4, hr // 4, 3)), jnp.float32),
           "noise": jnp.asarray(rng.normal(size=(2, *lat)), jnp.float32),
           "t": jnp.asarray([0.1, 0.6], jnp.float32)}
  frozen = {"vae": vae[1], "model": jax.tree.map(jnp.asarray, model.frozen_inputs())}
  mesh = jax.make_mesh((1, 1), step_lib.AXIS, devices=jax.devices()[:1])
  grad = jax.jit(jax.shard_map(
      lambda p, b, f: jax.grad(lambda q: loss_fn(q, b, f)[0])(p), mesh=mesh,
      in_specs=(jax.sharding.PartitionSpec(),) * 3, out_specs=jax.sharding.PartitionSpec()))
  g = grad(params, batch, frozen)
  leaves = jax.tree.leaves(g)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
  assert sum(float(jnp.sum(jnp.abs(x))) for x in leaves) > 0


@pytest.mark.slow
def test_cli_runs_flux_tiny_end_to_end_and_diffusers_reads_its_export(tmp_path):
  """`python -m train --config=configs/flux_tiny.py` on the CPU: trains the tiny FLUX on
  the shipped retina VAE, samples, prints the table, and exports a diffusers folder that
  diffusers loads and runs to our model's outputs."""
  import subprocess  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "train", f"--config={ROOT}/configs/flux_tiny.py",
                         f"--workdir={workdir}"], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "stage flow: 4 steps, flux from scratch" in proc.stdout
  assert "model" in proc.stdout and "bicubic" in proc.stdout  # the table
  with open(workdir / "results.json") as f:
    assert np.isfinite(json.load(f)["validation"]["model"]["psnr"])
  out = str(workdir / "export" / "transformer")
  back = diffusers.FluxTransformer2DModel.from_pretrained(out).eval()
  ours = flux.from_diffusers(out)
  cfg = flux_tiny.get_config()
  assert back.config.joint_attention_dim == cfg.flux.joint_attention_dim
  rng = np.random.default_rng(0)
  inp = dict(hidden_states=rng.normal(size=(1, 6, 32)).astype(np.float32),
             encoder_hidden_states=rng.normal(size=(1, 8, 32)).astype(np.float32),
             pooled_projections=rng.normal(size=(1, 16)).astype(np.float32),
             timestep=np.array([0.4], np.float32), img_ids=flux.latent_image_ids(2, 3),
             txt_ids=np.zeros((8, 3), np.float32), guidance=np.array([3.5], np.float32))
  with torch.no_grad():
    theirs = back(**{k: torch.tensor(v) for k, v in inp.items()}).sample.numpy()
  with jax.default_matmul_precision("highest"):
    mine = np.asarray(ours(*(jnp.asarray(inp[k]) for k in (
        "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")),
                           inp["img_ids"], inp["txt_ids"], jnp.asarray(inp["guidance"])))
  np.testing.assert_allclose(mine, theirs, atol=2e-5 * np.abs(theirs).max())


@pytest.mark.slow
def test_resuming_against_other_flux_weights_fails(small_flux, tmp_path):
  """A run fine-tuning all of a diffusers FLUX (its config.json's widths, not flux_tiny's)
  records the weights' sha256 before its first step (stopped there, it leaves a step-0
  checkpoint); the workdir then refuses other weights, or none."""
  folder, _ = small_flux
  cfg = _config(pretrained=folder)
  workdir = str(tmp_path / "run")
  r = loop.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1], stop_after={"flow": 0})
  assert r["preempted"]
  with open(os.path.join(workdir, "pretrained_model.json")) as f:
    assert json.load(f)["sha256"] == flux.weights_sha256(flux.locate(folder).files)
  other = tmp_path / "other"
  _write_flux(other, seed=1)  # same architecture, other weights
  with pytest.raises(config_lib.ConfigError, match="config.flux.pretrained:.*sha256"):
    loop.train_and_evaluate(_config(pretrained=str(other)), workdir,
                            devices=jax.devices()[:1])
  with pytest.raises(config_lib.ConfigError, match="config.flux.pretrained: is ''"):
    loop.train_and_evaluate(_config(), workdir, devices=jax.devices()[:1])


def test_config_checks_name_the_flux_field(small_flux, tmp_path):
  folder, _ = small_flux
  cases = [
      (dict(pretrained=folder, guidance=None), "flux.guidance.*guidance_embeds=True"),
      (dict(guidance_embeds=False), "flux.guidance.*guidance_embeds=False"),
      (dict(axes_dims_rope=(4, 4, 4)), "config.flux.*axes_dims_rope"),
      (dict(remat="some"), "flux.remat"),
      (dict(pretrained=str(tmp_path)), "config.flux.pretrained.*config.json"),
  ]
  for fields, match in cases:
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate(config_lib.resolve(_config(**fields)), num_devices=1)
  wrong = tmp_path / "wrong_in"
  _write_flux(wrong, in_channels=64)
  with pytest.raises(config_lib.ConfigError, match="vae.latent_channels.*in_channels=64"):
    config_lib.validate(_config(pretrained=str(wrong)), num_devices=1)


def test_prompt_embeddings_file(tmp_path):
  from safetensors.numpy import save_file
  good = tmp_path / "prompt.safetensors"
  save_file({"prompt_embeds": np.ones((1, 8, 32), np.float32),
             "pooled_prompt_embeds": np.full((1, 16), 2.0, np.float32)}, str(good))
  cfg = _config(prompt_embeds=str(good))
  config_lib.validate(cfg, num_devices=1)
  inputs = velocity.for_config(cfg).frozen_inputs()
  assert inputs["prompt_embeds"].shape == (8, 32) and inputs["pooled_prompt_embeds"][0] == 2.0
  zeros = velocity.for_config(_config()).frozen_inputs()  # no file: zero embeddings
  assert zeros["prompt_embeds"].shape == (8, 32) and not zeros["prompt_embeds"].any()
  save_file({"prompt_embeds": np.ones((8, 31), np.float32),
             "pooled_prompt_embeds": np.ones((16,), np.float32)}, str(tmp_path / "w.safetensors"))
  with pytest.raises(config_lib.ConfigError, match="flux.prompt_embeds.*joint_attention_dim=32"):
    config_lib.validate(_config(prompt_embeds=str(tmp_path / "w.safetensors")), num_devices=1)
  save_file({"prompt_embeds": np.ones((4, 32), np.float32),
             "pooled_prompt_embeds": np.ones((16,), np.float32)}, str(tmp_path / "l.safetensors"))
  with pytest.raises(config_lib.ConfigError, match="flux.prompt_length=4"):
    config_lib.validate(_config(prompt_embeds=str(tmp_path / "l.safetensors")), num_devices=1)
  with pytest.raises(config_lib.ConfigError, match="flux.prompt_embeds.*no file"):
    config_lib.validate(_config(prompt_embeds=str(tmp_path / "none")), num_devices=1)


def test_pipeline_folder_brings_its_vae(small_flux, tmp_path):
  """`flux.pretrained=<pipeline folder>` with a vae/: the run's VAE is the pipeline's."""
  folder, _ = small_flux
  pipe = tmp_path / "pipe"
  os.makedirs(pipe)
  os.symlink(folder, pipe / "transformer")
  os.symlink(os.path.join(ROOT, "train", "assets", "retina_vae"), pipe / "vae")
  cfg = _config(pretrained=str(pipe))
  cfg.vae.pretrained = ""
  resolved = config_lib.resolve(cfg)
  assert resolved.vae.pretrained == str(pipe) and cfg.vae.pretrained == ""
  config_lib.validate(resolved, num_devices=1)
