"""Building blocks of NVAE (NHWC activations, HWIO kernels, float32 parameters)."""

from nvae_jax.nn.activations import elu, swish
from nvae_jax.nn.ar import ARCell, ARConv2D, PairedARCell, ar_channel_mask, ar_conv_mask
from nvae_jax.nn.cells import (DecCombiner, EncCombiner, FactorizedReduce, MBConvCell,
                               ResBNSwishCell)
from nvae_jax.nn.conv import (CONV_KERNELS, DEPTHWISE_IMPLS, Conv2D, conv2d, depthwise_conv,
                              weight_normalize)
from nvae_jax.nn.norm import BatchNorm
from nvae_jax.nn.resample import upsample_bilinear2x_align_corners, upsample_nearest2x
from nvae_jax.nn.se import SqueezeExcite

__all__ = [
    'ARCell', 'ARConv2D', 'BatchNorm', 'CONV_KERNELS', 'Conv2D', 'DEPTHWISE_IMPLS', 'DecCombiner',
    'EncCombiner', 'FactorizedReduce', 'MBConvCell', 'PairedARCell', 'ResBNSwishCell',
    'SqueezeExcite', 'ar_channel_mask', 'ar_conv_mask', 'conv2d', 'depthwise_conv', 'elu',
    'swish', 'upsample_bilinear2x_align_corners', 'upsample_nearest2x', 'weight_normalize',
]
