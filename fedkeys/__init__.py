"""fedkeys: federated learning of keyboard next-word models on real devices."""

__version__ = "0.1.0"
