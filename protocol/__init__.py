"""fedkeys protocol: the pure library shared by the coordinator and the devices.

Modules: :mod:`protocol.layout` (flat parameter layout), :mod:`protocol.bundle` (model bundle
manifest), :mod:`protocol.codec` (update encoding and decoding), :mod:`protocol.wire` (typed
messages and the binary update format) and :mod:`protocol.secagg` (secure aggregation).

Everything here is pure: numpy, cryptography and pydantic only; no I/O, no network, no global
state beyond caches of deterministic values.
"""

__all__: list[str] = []
