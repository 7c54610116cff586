"""Taming methods: objectives, the paper's method, baselines and the vector method."""
