"""pirl: Pretext-Invariant Representation Learning (Misra & van der Maaten, CVPR 2020).

The public API is small:

- :func:`pretrain` runs (or resumes) a pretraining job into a run folder;
- :func:`load_backbone` returns a torchvision ResNet from a pirl checkpoint, a ``trunk.pt``, a
  torchvision / Detectron2 state dict or a VISSL checkpoint;
- :func:`export_trunk` writes a trunk in the torchvision or Detectron2 key layout;
- :class:`Config` / :func:`from_preset` are the typed run configuration;
- :mod:`pirl.losses` holds the loss functions (``nce``, ``nce_fixed_z``, ``infonce``).
"""

from pirl.config import Config, ConfigError, from_preset
from pirl.export import export_trunk, load_backbone
from pirl.train import pretrain

__all__ = ["Config", "ConfigError", "export_trunk", "from_preset", "load_backbone", "pretrain"]
__version__ = "0.1.0"
