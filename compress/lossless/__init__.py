"""Lossless ZipNN-style packing of weights, integer codes and masks (the ``compress`` stage).

Kept light on purpose: the codec and container import only numpy and zstandard, so the
edge path can read packed files without torch or pydantic. The stage registers in
``compress.lossless.config``.
"""
