"""Update codec: clip, rotate, subsample, quantize into a ring, bit-pack; and the way back.

Every device of a round uses the same :class:`CodecParams` (from the round plan), so the server
can add the encoded vectors modulo ``2**k`` and decode only the sum (:func:`encode` on each
device, :func:`decode_mean` / :func:`decode_sum` on the server). One update's path, each step
in the module that holds it:

1. Clip to ``clip_norm`` and weight by the example count (:mod:`protocol.codec.quantize`).
2. Randomised Hadamard rotation, blockwise over interleaved power-of-two blocks
   (:mod:`protocol.codec.rotation`; block size and padding: :mod:`protocol.codec.params`).
3. Keep a subset of the coordinates shared by the round; its rotation signs and subset come
   from the round seed (:mod:`protocol.codec.randomness`).
4. Unbiased stochastic quantization to ``b`` bits in a range common to the round, into the
   ring ``Z_(2**k)`` whose width holds the sum of every device without wrapping
   (:mod:`protocol.codec.quantize`; ring width: :mod:`protocol.codec.params`).
5. Dense ``k``-bit packing for the wire (:mod:`protocol.codec.packing`).

Steps 2 to 4 are the random rotation and stochastic quantization of Suresh, Yu, Kumar & McMahan
2017 ("Distributed Mean Estimation with Limited Communication", ICML), and the random rotation,
subsampling and probabilistic quantization of Konecny et al. 2016 ("Federated Learning:
Strategies for Improving Communication Efficiency", arXiv:1610.05492), with the randomness and
the quantization range shared by the round so that secure aggregation can add the encodings.

The keystream of the stochastic-rounding dither is :mod:`protocol.keystream`; the DP noise a
device may add is :mod:`protocol.dp`'s.
"""

from protocol.codec.packing import (
    check_packed,
    pack_bits,
    pack_bits_into,
    packed_size,
    unpack_bits,
    unpack_bits_add,
)
from protocol.codec.params import (
    MAX_RING_BITS,
    CodecError,
    CodecParams,
    CodecSettings,
    NormBoundError,
    check_rotation_block,
    encoded_length,
    kept_count,
    padded_dim,
    quant_range,
    ring_bits,
    rotation_block,
)
from protocol.codec.quantize import (
    NOISE_NORM_TAIL,
    DecodedMean,
    EncodedUpdate,
    check_update_norm,
    decode_mean,
    decode_sum,
    encode,
    mean_norm_bound,
    ring_sum,
    unclipped_count,
)
from protocol.codec.randomness import kept_indices, rotation_signs
from protocol.codec.rotation import fwht, rotate, unrotate

__all__ = [
    "MAX_RING_BITS",
    "NOISE_NORM_TAIL",
    "CodecError",
    "CodecParams",
    "CodecSettings",
    "DecodedMean",
    "EncodedUpdate",
    "NormBoundError",
    "check_packed",
    "check_rotation_block",
    "check_update_norm",
    "decode_mean",
    "decode_sum",
    "encode",
    "encoded_length",
    "fwht",
    "kept_count",
    "kept_indices",
    "mean_norm_bound",
    "pack_bits",
    "pack_bits_into",
    "packed_size",
    "padded_dim",
    "quant_range",
    "ring_bits",
    "ring_sum",
    "rotate",
    "rotation_block",
    "rotation_signs",
    "unclipped_count",
    "unpack_bits",
    "unpack_bits_add",
    "unrotate",
]
