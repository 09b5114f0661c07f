"""lorafuse: fold LoRA adapters into their base models as a stream, one tensor at a time."""

__version__ = "0.1.0"  # first: submodules read it while the package initialises

from .api import MergeReport, merge, plan
from .errors import LorafuseError

__all__ = ["merge", "plan", "MergeReport", "LorafuseError"]
