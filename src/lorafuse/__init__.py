"""lorafuse: fold LoRA adapters into their base models as a stream, one tensor at a time."""

from .api import MergeReport, merge, plan
from .errors import LorafuseError
from .training import save_pretrained_merged
from .version import __version__

__all__ = ["merge", "plan", "save_pretrained_merged", "LorafuseMergeCallback", "MergeReport", "LorafuseError",
           "__version__"]


def __getattr__(name: str):
    """LorafuseMergeCallback subclasses transformers' TrainerCallback: made on first use, so that importing
    lorafuse imports neither transformers nor torch."""
    if name == "LorafuseMergeCallback":
        from . import training

        return training.LorafuseMergeCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
