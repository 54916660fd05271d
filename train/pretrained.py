"""Provenance of pretrained weights in a run: the frozen VAE, and the velocity model's.

A pretrained VAE (`--config.vae.pretrained=<diffusers folder>`) is loaded
with `train.models.vae.from_diffusers`, frozen, and the vae stage is skipped.
A pretrained velocity model (`--config.flux.pretrained=<diffusers folder>`)
is the starting point of the flow stage. Each one's provenance — the path,
the weights file(s), their sha256 and the config.json — is written to
`<workdir>/pretrained_vae.json` / `pretrained_model.json` and logged, and
checked again on resume: a flow stage trained against some weights must never
be continued against others (different latents or base, silently wrong).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from train import config as config_lib

RECORD_NAME = "pretrained_vae.json"
MODEL_RECORD_NAME = "pretrained_model.json"  # the velocity model's (FLUX from diffusers)


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


# What a record is of: its file in the workdir, the config field, the word
# for it in messages, and the stage directories whose checkpoints depend on it.
KINDS = {"vae": (RECORD_NAME, "vae.pretrained", "VAE", ("vae", "flow")),
         "model": (MODEL_RECORD_NAME, "flux.pretrained", "transformer", ("flow",))}


def check_and_record(workdir: str, record: dict[str, Any] | None, *, write: bool,
                     kind: str = "vae") -> None:
  """Checks the workdir's provenance of pretrained weights against this run's; writes it on a fresh run.

  Args:
    workdir: the run's directory.
    record: `describe(config.vae.pretrained)` (kind 'vae') or the velocity
      model's `describe_pretrained()` (kind 'model'); None when the run
      starts from no pretrained weights of that kind.
    write: whether this process writes the record (process 0).
    kind: 'vae' (`pretrained_vae.json`) or 'model' (`pretrained_model.json`).

  Raises:
    ConfigError naming the config field when the workdir was trained with
    other weights (another sha256, weights it trained itself, or pretrained
    ones while this run has none).
  """
  fname, field, what, stages = KINDS[kind]
  path = os.path.join(workdir, fname)
  old = None
  if os.path.isfile(path):
    with open(path) as fh:
      old = json.load(fh)
  if record is None:
    if old is not None:
      raise config_lib.ConfigError(
          f"config.{field}: is '' but {path} says this workdir's flow stage uses the "
          f"pretrained {what} {old['path']}; pass --config.{field}={old['path']} or use a "
          "new workdir")
    return
  if old is None:
    if any(_has_checkpoints(os.path.join(workdir, stage)) for stage in stages):
      raise config_lib.ConfigError(
          f"config.{field}: {workdir} holds checkpoints of a run that trained its own "
          f"{what}; a pretrained {what} needs a new workdir")
  elif old["sha256"] != record["sha256"]:
    raise config_lib.ConfigError(
        f"config.{field}: {record['weights']} has sha256 {record['sha256'][:16]}..., but "
        f"this workdir was trained with {old['weights']} (sha256 {old['sha256'][:16]}...); "
        f"resuming against other {what} weights would be silently wrong: use a new workdir")
  logging.info("pretrained %s %s (weights %s, sha256 %s)", what, record["path"],
               record["weights"], record["sha256"])
  if write and old is None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
      json.dump(record, fh, indent=1)
    os.replace(tmp, path)  # atomic: a kill never leaves half a record
