"""Checkpoints, converters and atomic files."""
