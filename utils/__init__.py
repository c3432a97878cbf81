"""Machinery shared by every feature type: config, decoding, windows, weights, output, runner."""
