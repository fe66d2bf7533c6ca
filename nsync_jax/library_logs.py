"""The diffusers and transformers Flax deprecation notices, dropped.

diffusers 0.39 and transformers 4.57 log "Flax classes are deprecated ..." every time one
of their Flax classes is constructed, and diffusers also from the class bodies of some
Flax modules (`embeddings_flax`): when they are first imported. Programs drop the notices
for good (`drop_deprecation_notices`, from `cli.setup_logging`); our modules import those
libraries inside `quiet_import()`, which drops them only while the import runs, so that
importing nsync_jax leaves the libraries' logging as it found it. Other warnings from
these libraries still show.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

_DEPRECATION_MARKERS = (
    "Flax classes are deprecated",
    "TensorFlow and JAX classes are deprecated",
)


class _DropDeprecationNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(marker in message for marker in _DEPRECATION_MARKERS)


def _library_handlers() -> list[logging.Handler]:
    # Their loggers propagate to a library root logger with its own handler, so filters go
    # on that handler (a filter on a logger sees only records logged on that logger).
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    return [
        handler
        for library_logging in (diffusers_logging, transformers_logging)
        # get_logger() configures the library root logger (and its handler) once.
        for handler in library_logging.get_logger().handlers
    ]


def drop_deprecation_notices() -> None:
    """Drops the notices from now on (once per handler, however often it is called)."""
    for handler in _library_handlers():
        if not any(isinstance(f, _DropDeprecationNotices) for f in handler.filters):
            handler.addFilter(_DropDeprecationNotices())


@contextlib.contextmanager
def quiet_import() -> Iterator[None]:
    """Drops the notices while the block (an import of the libraries' Flax modules) runs."""
    added = []
    for handler in _library_handlers():
        added.append((handler, _DropDeprecationNotices()))
        handler.addFilter(added[-1][1])
    try:
        yield
    finally:
        for handler, dropped in added:
            handler.removeFilter(dropped)
