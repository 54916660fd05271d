"""Config validation: every inconsistent setting fails with one message naming the field."""

import importlib.util
import os

import ml_collections
import pytest

from train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILES = ("base", "default", "pixel_only", "ssim_only", "mixed", "tiny", "vae_retina", "mse_only",
                "flow_retina_base", "pod", "study_fundus", "study_vae")


def load(name):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_shipped_configs_are_valid(name):
  config_lib.validate(load(name), num_devices=8)


def test_pod_7b_config_is_valid_on_its_two_topologies():
  cfg = load("pod_7b")
  config_lib.validate(cfg, num_devices=256)  # v5e:16x16, batch 256, fsdp 256
  cfg.batch_size, cfg.mesh.fsdp = 16, 8
  config_lib.validate(cfg, num_devices=8)  # one v5p-8 host


def test_modes_differ():
  assert load("pixel_only").ssim_loss_weight == 0 and load("pixel_only").pixel_loss_weight > 0
  assert load("ssim_only").pixel_loss_weight == 0 and load("ssim_only").ssim_loss_weight > 0
  mixed = load("mixed")
  assert mixed.pixel_loss_weight > 0 and mixed.ssim_loss_weight > 0
  base = load("base")
  assert (base.ssim_loss_weight, base.ssim_loss_max_t, base.ssim_window_size) == (0.0, 0.3, 11)


def _set(c, dotted, value):
  *path, last = dotted.split(".")
  node = c
  for p in path:
    node = node[p]
  with node.unlocked() if hasattr(node, "unlocked") else _null():
    node[last] = value


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


BAD = [
    # (overrides, field named in the message, num_devices)
    ({"pixel_loss_weight": 0.0, "ssim_loss_weight": 0.5, "vae.enabled": False},
     "ssim_loss_weight", 8),
    ({"pixel_loss_weight": 0.5, "ssim_loss_weight": 0.0, "vae.enabled": False},
     "pixel_loss_weight", 8),
    ({"mse_loss_weight": 0.0, "pixel_loss_weight": 0.0, "ssim_loss_weight": 0.0},
     "mse_loss_weight", 8),
    ({"ssim_loss_max_t": 0.0}, "ssim_loss_max_t", 8),
    ({"ssim_loss_max_t": -0.3}, "ssim_loss_max_t", 8),
    ({"ssim_loss_max_t": 1.5}, "ssim_loss_max_t", 8),
    ({"batch_size": 12}, "batch_size", 8),
    ({"batch_size": 4, "mesh.fsdp": 2}, "batch_size", 8),
    ({"mesh.fsdp": 3}, "mesh.fsdp", 8),
    ({"mesh.fsdp": 16}, "mesh.fsdp", 8),
    ({"mesh.fsdp": 0}, "mesh.fsdp", 8),
    ({"mesh.min_shard_size": -1}, "mesh.min_shard_size", 8),
    ({"batch_size": 0}, "batch_size", 1),
    ({"ssim_window_size": 8}, "ssim_window_size", 8),
    ({"ssim_window_size": 129}, "ssim_window_size", 8),
    ({"chunk_size": 0}, "chunk_size", 8),
    ({"pixel_loss_weight": -1.0}, "pixel_loss_weight", 8),
    ({"ssim_loss_weight": float("nan")}, "ssim_loss_weight", 8),
    ({"pixel_loss_type": "huber"}, "pixel_loss_type", 8),
    ({"precision": "float16"}, "precision", 8),
    ({"schedule": "linear"}, "schedule", 8),
    ({"max_consecutive_skips": 0}, "max_consecutive_skips", 8),
    ({"data.hr_size": 63}, "data.hr_size", 8),
    ({"data.num_workers": -1}, "data.num_workers", 8),
    ({"dit.num_heads": 3}, "dit.num_heads", 8),
    ({"dit.patch_size": 5}, "dit.patch_size", 8),
    ({"dit.remat": "dots"}, "dit.remat", 8),
    ({"vae.channels": ()}, "vae.channels", 8),
    ({"vae.l1_weight": 0.0, "vae.ssim_weight": 0.0}, "vae.l1_weight", 8),
    ({"flow.learning_rate": 0.0}, "flow.learning_rate", 8),
    ({"eval_num_images": 100}, "eval_num_images", 8),
    ({"t_logit_std": 0.0}, "t_logit_std", 8),
    ({"seed": -1}, "seed", 8),
    # 64 px with window 11 fits 3 MS-SSIM scales ((11 - 1) * 2^2 + 1 = 41), not 4 (81).
    ({"ssim_loss_levels": 4}, "ssim_loss_levels", 8),
    ({"ssim_loss_levels": 0}, "ssim_loss_levels", 8),
    ({"vae.ssim_levels": 4}, "vae.ssim_levels", 8),
    ({"grad_accum_steps": 0}, "grad_accum_steps", 8),
    ({"ema.decay": 1.0}, "ema.decay", 8),
    ({"ema.decay": -0.1}, "ema.decay", 8),
    # (A config file written from scratch: overrides keep a field's type.)
    ({"ema": ml_collections.ConfigDict(dict(decay=0.9, warmup=1, use_for_eval=True))},
     "ema.warmup", 8),
    ({"ema": ml_collections.ConfigDict(dict(decay=0.9, warmup=True, use_for_eval="yes"))},
     "ema.use_for_eval", 8),
    ({"preemption_check_every": 0}, "preemption_check_every", 8),
]


@pytest.mark.parametrize("overrides,field,ndev", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_field_fails_with_its_name(overrides, field, ndev):
  c = load("default")
  for k, v in overrides.items():
    _set(c, k, v)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, num_devices=ndev)
  assert str(e.value).startswith(f"config.{field}:"), str(e.value)


def test_pretrained_dit_must_match_the_architecture(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from train.models import dit  # pylint: disable=g-import-not-at-top
  cfg = load("tiny")
  arch = dict(latent_channels=cfg.vae.latent_channels,
              **{k: cfg.dit[k] for k in dit.CONFIG_FIELDS if k != "latent_channels"})
  params = {"embed": {"kernel": np.ones((3, 2), np.float32)}, "out": {"bias": np.zeros(2)}}
  dit.save_pretrained(params, str(tmp_path / "ok"), model_config=arch)
  got_cfg, got = dit.load_pretrained(str(tmp_path / "ok"))
  assert got_cfg == arch
  np.testing.assert_array_equal(got["embed"]["kernel"], params["embed"]["kernel"])
  cfg.dit.pretrained = str(tmp_path / "ok")
  config_lib.validate(cfg, num_devices=8)
  dit.save_pretrained(params, str(tmp_path / "wide"),
                      model_config=dict(arch, hidden_size=arch["hidden_size"] * 2))
  cfg.dit.pretrained = str(tmp_path / "wide")
  with pytest.raises(config_lib.ConfigError, match="config.dit.hidden_size"):
    config_lib.validate(cfg, num_devices=8)
  # The right architecture in config.json but other tensors: named when loaded.
  cfg.dit.pretrained = str(tmp_path / "ok")
  from train import loop  # pylint: disable=g-import-not-at-top
  with pytest.raises(config_lib.ConfigError, match="config.dit.pretrained=.*do not match"):
    loop.build_models(cfg)
  cfg.dit.pretrained = str(tmp_path / "missing")
  with pytest.raises(config_lib.ConfigError, match="config.dit.pretrained"):
    config_lib.validate(cfg, num_devices=8)


def test_missing_field_is_named():
  c = load("default")
  del c["chunk_size"]
  with pytest.raises(ValueError, match="config.chunk_size: is missing"):
    config_lib.validate(c, num_devices=1)


def test_config_error_is_a_value_error():
  assert issubclass(config_lib.ConfigError, ValueError)
