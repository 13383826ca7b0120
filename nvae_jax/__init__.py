"""nvae_jax: NVAE, calibrated decoders and invertible d x d convolution flows in JAX/Flax."""
