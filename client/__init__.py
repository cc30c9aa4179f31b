"""fedsqueeze on the client: a reusable compression mod and a ready-made training ClientApp."""

from fedsqueeze.client.mod import CompressionMod, compression_mod

__all__ = ["CompressionMod", "compression_mod"]
