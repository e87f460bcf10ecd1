"""fedkeys: federated learning of keyboard next-word models on real devices."""

from protocol.version import __version__

__all__ = ["__version__"]
