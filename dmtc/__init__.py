"""dmtc: semi-supervised semantic segmentation by Dynamic Mutual Training (DMT) and DMTC."""

from dmtc.errors import DMTCError

__all__ = ["DMTCError"]
__version__ = "0.1.0"
