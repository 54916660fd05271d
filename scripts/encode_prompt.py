"""Encodes one prompt with FLUX.1's text encoders, once, for `--config.flux.prompt_embeds`.

  python scripts/encode_prompt.py --pipeline=/path/to/FLUX.1-Kontext-dev \\
      --prompt="a sharp, high-resolution retinal fundus photograph" --out=prompt.safetensors

Loads only the text encoders and tokenizers of a diffusers FLUX pipeline folder
(`text_encoder/` CLIP, `text_encoder_2/` T5 and their tokenizers; no
transformer, no VAE) and writes diffusers' `FluxPipeline.encode_prompt`
outputs as float32: `prompt_embeds [max_sequence_length, 4096]` and
`pooled_prompt_embeds [768]`, with the prompt and the folder in the file's
metadata. Training never runs the text encoders: the prompt is fixed, so its
embeddings are computed here once and read by the trainer.

Needs torch, diffusers and transformers (`pip install torch diffusers
transformers sentencepiece`), not needed to train.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

_PIPELINE = flags.DEFINE_string("pipeline", None, "A diffusers FLUX.1 pipeline folder.")
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt (CLIP and T5 both see it).")
_OUT = flags.DEFINE_string("out", None, "Output .safetensors file.")
_MAX_LEN = flags.DEFINE_integer("max_sequence_length", 512,
                                "T5 tokens (512 for [dev] and Kontext, 256 for [schnell]); "
                                "the trainer's flux.prompt_length must equal it.")
flags.mark_flags_as_required(["pipeline", "prompt", "out"])


def encode(pipeline: str, prompt: str, *, max_sequence_length: int = 512) -> dict:
  """`{'prompt_embeds': [L, D], 'pooled_prompt_embeds': [P]}` float32 numpy of `prompt`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from diffusers import FluxPipeline  # pylint: disable=g-import-not-at-top

  for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
    if not os.path.isdir(os.path.join(pipeline, sub)):
      raise ValueError(f"--pipeline={pipeline!r}: no {sub}/ (a diffusers FLUX.1 pipeline "
                       "folder has text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/)")
  pipe = FluxPipeline(
      scheduler=None, vae=None, transformer=None,
      text_encoder=transformers.CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder"),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer"),
      text_encoder_2=transformers.T5EncoderModel.from_pretrained(pipeline,
                                                                 subfolder="text_encoder_2"),
      tokenizer_2=transformers.T5TokenizerFast.from_pretrained(pipeline, subfolder="tokenizer_2"))
  with torch.no_grad():
    prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None,
                                                  max_sequence_length=max_sequence_length)
  return {"prompt_embeds": prompt_embeds[0].float().numpy(),
          "pooled_prompt_embeds": pooled[0].float().numpy()}


def main(argv):
  del argv
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tensors = encode(_PIPELINE.value, _PROMPT.value, max_sequence_length=_MAX_LEN.value)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  save_file(tensors, _OUT.value, metadata={"prompt": _PROMPT.value,
                                           "pipeline": os.path.abspath(_PIPELINE.value)})
  l, d = tensors["prompt_embeds"].shape
  print(f"{_OUT.value}: prompt_embeds [{l}, {d}], pooled_prompt_embeds "
        f"[{tensors['pooled_prompt_embeds'].shape[0]}]; train with "
        f"--config.flux.prompt_embeds={_OUT.value} --config.flux.prompt_length={l}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
