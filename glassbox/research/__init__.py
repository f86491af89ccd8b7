"""Instruments over the serving engine: what /debug, /cache, /optimization and /pipeline expose."""
