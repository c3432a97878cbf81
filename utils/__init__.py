"""Machinery shared by every feature type: config, decoding, windows, weights, output, runner."""

#: the tool's version, recorded beside every output
__version__ = "0.3.0"
