"""Lightning's notices that users can act on none of, dropped around a block (never globally).

Every ``pl.Trainer`` logs rank-zero INFO lines ("GPU available: ...", "TPU available: ...", a logging tip,
"max_epochs reached"), and Lightning's own code raises one deprecation warning under this torch
("isinstance(treespec, LeafSpec) is deprecated"). KCF builds 2 Trainers per fold and ``prf score
--devices`` one per rank: their notices would bury the project's own progress lines. Other warnings and
every error still show.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

_LIGHTNING_INFO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")
_LIGHTNING_INTERNAL_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


@contextlib.contextmanager
def lightning_info_silenced(*extra_messages: str) -> Iterator[None]:
    """Within the block, Lightning's rank-zero INFO messages and its internal pytree deprecation warning
    are dropped, and so are warnings matching any of ``extra_messages`` (regular expressions, as
    ``warnings.filterwarnings`` takes them); loggers and warning filters are restored on exit."""
    loggers = [logging.getLogger(name) for name in _LIGHTNING_INFO_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            for message in (_LIGHTNING_INTERNAL_DEPRECATION, *extra_messages):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
