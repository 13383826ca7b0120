"""The contract of an output (decoder) likelihood.

An output distribution is a flax module that turns the decoder network's raw output
``net_out`` (float ``[B, H, W, K]`` with ``K = num_channels(C)``) into a likelihood over images
``x`` (float32 ``[B, H, W, C]`` in ``[0, 1]``, quantised to ``num_bits`` or binary).  Modules may
own parameters (a learned shared sigma) or state in the ``'batch_stats'`` collection (the running
optimal sigma used at evaluation), so they live inside the model's variable tree.

Methods (all per example, summed over H, W, C, in nats):

* ``log_prob(net_out, x, train)`` -> ``[B]`` log-likelihood (float32 whatever the compute dtype);
* ``sample(net_out, rng, temperature)`` -> ``[B, H, W, C]`` in ``[0, 1]``;
* ``mean(net_out)`` -> ``[B, H, W, C]`` in ``[0, 1]``.

Class attributes: ``continuous`` (True for Gaussian densities, whose "bits/dim" is not a discrete
likelihood) and ``num_channels(image_channels)`` (a staticmethod or classmethod).
"""
