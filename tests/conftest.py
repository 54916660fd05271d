"""Test session setup.

Eight fake CPU devices are configured before JAX initialises, so that
`jax.shard_map` tests run in-process over a real 8-device mesh; tests that
need one device take `jax.devices()[:1]`.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import hypothesis  # noqa: E402

# One deterministic profile: CI is reproducible and bounded in time.
hypothesis.settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=15,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow,
                           hypothesis.HealthCheck.data_too_large],
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
