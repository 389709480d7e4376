"""torch models: InfoGAN with a WGAN-GP loss, training, batched inference, metrics."""
