"""compress: model compression and edge-deployment pipeline.

Kept import-light on purpose: `compress --help` must not import torch.
"""

__version__ = "0.1.0"
