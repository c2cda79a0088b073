"""Runners execute augmenter requests through an engine: local, Ray Data, Beam."""
