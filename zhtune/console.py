"""What a zhtune command prints: its own lines, and from the libraries only what a user must see.

By default (``zhtune COMMAND`` without ``--verbose``) the libraries zhtune builds on are made quiet: transformers' and
huggingface_hub's progress bars (one "Loading weights" bar per model load, "Writing model shards" per save) and their
info/warning chatter are off, and deprecation warnings raised inside transformers, peft, accelerate and torch (which a
user cannot act on) are not shown. zhtune's own messages (``zhtune.*`` loggers) print as plain lines, and zhtune's
own progress bars (training, merging, correction) stay. ``--verbose`` restores every library's output.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LIBRARIES = ("transformers", "peft", "accelerate", "torch", "huggingface_hub", "tokenizers", "datasets")


def configure_console(verbose: bool = False) -> None:
    """Set up zhtune's own log lines and quiet (or, with ``verbose``, restore) the libraries'."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    zhtune_log = logging.getLogger("zhtune")
    zhtune_log.handlers = [handler]
    zhtune_log.setLevel(logging.DEBUG if verbose else logging.INFO)
    zhtune_log.propagate = False
    if verbose:
        warnings.resetwarnings()
        return
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        for library in LIBRARIES:
            warnings.filterwarnings("ignore", category=category, module=rf"{library}(\.|$)")
    for library in LIBRARIES:
        logging.getLogger(library).setLevel(logging.ERROR)
    # read by transformers and huggingface_hub when they are imported (later, and only by commands that need them)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:  # already imported: tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
