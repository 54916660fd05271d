"""The test environment's JAX starts quietly on a CPU machine.

libtpu or the CUDA plugin in the environment would make every `import jax;
jax.devices()` try to start them and print their initialisation errors ("could
not determine TPU accelerator type", "unexpected worker hostname", a cuInit
traceback). The compile-only tests get them from their own folder instead
(tests/plan_plugins.py), so the `test` extra must not bring them.
"""

import os
import re
import subprocess
import sys


def test_import_jax_prints_no_accelerator_errors(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "PYTHONPATH", "SSIM_JAX_PLAN_PLUGINS")}
  result = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  assert "CpuDevice" in result.stdout, result.stdout
  noise = [line for line in result.stderr.splitlines()
           if re.search(r"tpu|cuda|cuinit|accelerator|hostname|plugin", line, re.I)]
  assert not noise, "\n".join(noise)
