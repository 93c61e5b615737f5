"""edgeq: convert, quantize, deploy and benchmark ML models on edge devices."""

__version__ = "0.1.0"
