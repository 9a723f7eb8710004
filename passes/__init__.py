"""Graph passes, one module per pass, each registered under its recipe name.

Importing :func:`compressor.pipeline.available_passes` loads every module here.
"""
