"""Streaming, mergeable statistics over recorded unit responses.

Each statistic has ``add``, ``result``, ``state_dict``/``set_state_dict`` and
``merge``, so a pass can be checkpointed, resumed, and sharded across ranks.
"""

from advinterp.stats.iou import DeferredIoU, IoUCounts
from advinterp.stats.quantile import Quantile, TopQuantile
from advinterp.stats.topk import TopK, k_for_fraction, top_responses

__all__ = [
    "DeferredIoU",
    "IoUCounts",
    "Quantile",
    "TopK",
    "TopQuantile",
    "k_for_fraction",
    "top_responses",
]
