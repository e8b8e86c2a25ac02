"""Faster ways to compute what the model computes: CPU kernels picked by measurement, int8 weights,
the logit-free training loss and compiled decoding. Applied to a model from outside it."""
