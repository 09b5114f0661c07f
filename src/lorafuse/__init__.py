"""lorafuse: fold LoRA adapters into their base models as a stream, one tensor at a time."""

from .api import MergeReport, merge, plan
from .errors import LorafuseError
from .version import __version__

__all__ = ["merge", "plan", "MergeReport", "LorafuseError", "__version__"]
