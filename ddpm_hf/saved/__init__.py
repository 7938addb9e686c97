"""Pipelines as saved: sound weights, loading a pipeline, saving one with the hashes our commands verify."""
