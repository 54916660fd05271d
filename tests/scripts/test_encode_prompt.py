"""scripts/encode_prompt.py on a tiny FLUX pipeline folder (random CLIP and T5, small vocabularies).

The file it writes is what the trainer reads (`--config.flux.prompt_embeds`),
and its embeddings are the text encoders' own outputs: T5's last hidden state
(padded to max_sequence_length) and CLIP's pooled output.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from train import config as config_lib
from train import velocity
import optional  # tests/ is on the path

torch = optional.require("torch")
transformers = optional.require("transformers")
optional.require("diffusers")  # encode_prompt builds FluxPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import flux_tiny  # noqa: E402  pylint: disable=g-import-not-at-top
from scripts import encode_prompt  # noqa: E402  pylint: disable=g-import-not-at-top

WORDS = ["a", "sharp", "retina", "photo"]


def _pipeline(folder):
  """text_encoder/ tokenizer/ (CLIP, width 16) and text_encoder_2/ tokenizer_2/ (T5, width 32)."""
  torch.manual_seed(0)
  chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
  vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
  os.makedirs(folder / "tokenizer")
  with open(folder / "tokenizer" / "vocab.json", "w") as f:
    json.dump(vocab, f)
  (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
  clip_tok = transformers.CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"),
                                        str(folder / "tokenizer" / "merges.txt"),
                                        model_max_length=77)
  clip_tok.save_pretrained(folder / "tokenizer")
  clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(vocab) - 2,
      eos_token_id=len(vocab) - 1))
  clip.save_pretrained(folder / "text_encoder")
  t5_tok = transformers.T5TokenizerFast(
      vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
      + [("\u2581" + w, -1.0) for w in WORDS], extra_ids=0)
  t5_tok.save_pretrained(folder / "tokenizer_2")
  t5 = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=8, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=2))
  t5.save_pretrained(folder / "text_encoder_2")
  return clip.eval(), clip_tok, t5.eval(), t5_tok


def test_encode_prompt_writes_what_the_trainer_reads(tmp_path):
  clip, clip_tok, t5, t5_tok = _pipeline(tmp_path / "pipe")
  prompt = "a sharp retina photo"
  out = tmp_path / "prompt.safetensors"
  subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "encode_prompt.py"),
                  f"--pipeline={tmp_path / 'pipe'}", f"--prompt={prompt}", f"--out={out}",
                  "--max_sequence_length=8"], check=True, cwd=ROOT, timeout=600)
  got = velocity.read_prompt_embeds(str(out))
  with torch.no_grad():
    ids = t5_tok(prompt, padding="max_length", max_length=8, return_tensors="pt").input_ids
    want_t5 = t5(ids).last_hidden_state[0].numpy()
    clip_ids = clip_tok(prompt, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
    want_pooled = clip(clip_ids).pooler_output[0].numpy()
  assert got["prompt_embeds"].shape == (8, 32) and got["pooled_prompt_embeds"].shape == (16,)
  np.testing.assert_allclose(got["prompt_embeds"], want_t5, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["pooled_prompt_embeds"], want_pooled, rtol=1e-5, atol=1e-6)
  cfg = flux_tiny.get_config()  # joint_attention_dim 32, pooled 16, 8 tokens
  cfg.flux.prompt_embeds = str(out)
  config_lib.validate(cfg, num_devices=1)


def test_a_folder_without_text_encoders_is_named(tmp_path):
  with pytest.raises(ValueError, match="text_encoder/"):
    encode_prompt.encode(str(tmp_path), "a retina")
