"""fedsqueeze: compression for federated learning (codecs, Flower apps, simulation harness)."""

__version__ = "0.1.0"
