"""A pretrained (frozen) VAE in the trainer: `--config.vae.pretrained=<diffusers folder>`.

The VAE is loaded with `train.models.vae.from_diffusers`, frozen, and the vae
stage is skipped. Its provenance — the path, the weights file, its sha256 and
the config.json — is written to `<workdir>/pretrained_vae.json` and logged, and
checked again on resume: a flow stage trained against one VAE must never be
continued against another (different latents, silently wrong).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from train import config as config_lib

RECORD_NAME = "pretrained_vae.json"


def describe(path: str) -> dict[str, Any]:
  """Provenance of the pretrained VAE at `path`: paths, sha256 of the weights, config.

  Raises:
    ConfigError naming `vae.pretrained` when the checkpoint cannot be located.
  """
  from train.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  try:
    ckpt = vae_lib.locate_diffusers(path)
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f"config.vae.pretrained: {e}") from None
  return {"path": os.path.abspath(path), "weights": os.path.abspath(ckpt.weights),
          "sha256": vae_lib.weights_sha256(ckpt.weights), "config": ckpt.config}


def _has_checkpoints(directory: str) -> bool:
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


def check_and_record(workdir: str, record: dict[str, Any] | None, *, write: bool) -> None:
  """Checks the workdir's VAE provenance against this run's; writes it on a fresh run.

  Args:
    workdir: the run's directory.
    record: `describe(config.vae.pretrained)`, or None when the run trains its VAE.
    write: whether this process writes the record (process 0).

  Raises:
    ConfigError naming `vae.pretrained` when the workdir was trained with
    another VAE (another sha256, a trained VAE, or a pretrained one while this
    run trains its own).
  """
  path = os.path.join(workdir, RECORD_NAME)
  old = None
  if os.path.isfile(path):
    with open(path) as fh:
      old = json.load(fh)
  if record is None:
    if old is not None:
      raise config_lib.ConfigError(
          f"config.vae.pretrained: is '' but {path} says this workdir's flow stage uses the "
          f"pretrained VAE {old['path']}; pass --config.vae.pretrained={old['path']} or use a "
          "new workdir")
    return
  if old is None:
    if _has_checkpoints(os.path.join(workdir, "vae")) or _has_checkpoints(
        os.path.join(workdir, "flow")):
      raise config_lib.ConfigError(
          f"config.vae.pretrained: {workdir} holds checkpoints of a run that trained its own "
          "VAE; a pretrained VAE needs a new workdir")
  elif old["sha256"] != record["sha256"]:
    raise config_lib.ConfigError(
        f"config.vae.pretrained: {record['weights']} has sha256 {record['sha256'][:16]}..., but "
        f"this workdir was trained with {old['weights']} (sha256 {old['sha256'][:16]}...); "
        "resuming against other VAE weights would be silently wrong: use a new workdir")
  logging.info("pretrained VAE %s (weights %s, sha256 %s)", record["path"], record["weights"],
               record["sha256"])
  if write and old is None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
      json.dump(record, fh, indent=1)
    os.replace(tmp, path)  # atomic: a kill never leaves half a record
