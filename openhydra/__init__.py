"""OpenHydra: peer-to-peer LLM inference. Each node serves a contiguous span of a model's layers."""

__version__ = "0.1.0"
