"""The ssim_jax super-resolution trainer (`python -m train`, or `train.loop.train_and_evaluate`)."""
