"""fedkeys protocol: the pure library shared by the coordinator and the devices.

Modules: :mod:`protocol.layout` (flat parameter layout), :mod:`protocol.bundle` (model bundle:
manifest, loading, extraction), :mod:`protocol.codec` (update encoding and decoding),
:mod:`protocol.wire` (JSON messages and the binary update frame), :mod:`protocol.secagg`
(secure aggregation), :mod:`protocol.dp` (differential privacy), :mod:`protocol.keystream`
(the AES-128-CTR keystream under the masks, the codec's dither and the DP noise) and
:mod:`protocol.delta` (weight deltas).

Everything here is pure: numpy, cryptography and pydantic only; no network, no global state
beyond caches of deterministic values; the only file I/O is :mod:`protocol.bundle` reading,
extracting and packing a bundle.
"""

__all__: list[str] = []
