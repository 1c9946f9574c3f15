"""Warnings that every detectron2 run of this project printed and that are known to be
harmless, and the one call that filters them.

A warnings filter is process-wide, so no library module installs one: the entry points
(``tools/lazyconfig_train_net.py``, ``tools/visualize.py``, ``tools/demo.py``) call
:func:`ignore_known_harmless_warnings` before they import detectron2, because some of these
are raised at import time. Each filter names the message and the module that raises it, so
anything else from the same module still shows.
"""
import logging
import warnings

__all__ = ["ignore_known_harmless_warnings", "KNOWN_HARMLESS_WARNINGS"]

# (category, message, module that raises it): regular expressions matched at the start,
# as ``warnings.filterwarnings`` matches them
KNOWN_HARMLESS_WARNINGS = (
    # detectron2.modeling.box_regression and fvcore.nn.focal_loss apply @torch.jit.script
    # when imported; the pinned torch still scripts and runs them as usual, and this
    # project never exports TorchScript
    (FutureWarning, r"`torch\.jit\.script` is deprecated", r"torch\.jit\._script"),
    # detectron2's anchor generator calls torch.meshgrid without indexing=; the default it
    # gets, "ij", is the indexing it means
    (UserWarning, r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing argument",
     r"torch\.functional"),
    # detectron2.model_zoo imports pkg_resources; requirements.txt pins setuptools < 81,
    # which still ships it (docs/INSTALL.md)
    (UserWarning, r"pkg_resources is deprecated as an API", r"detectron2\.config\.lazy"),
    # bitmask targets (the demo's ring masks): detectron2's annotations_to_instances wraps
    # read-only decoded masks with torch.from_numpy only to torch.stack them, which copies;
    # nothing writes through the wrapper
    (UserWarning, r"The given NumPy array is not writable", r"detectron2\.data\.detection_utils"),
)

# Logged, not warned, by torch.fx once per process when detectron2's ROIPooler asks whether
# it is being traced: the answer is also true under torch.export, which only matters to
# code that is traced or exported, and nothing here is
_FX_LOGGER = "torch.fx._symbolic_trace"
_FX_NOTICE = "is_fx_tracing will return true for both fx.symbolic_trace and torch.export"


class _DropFxTracingNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_FX_NOTICE)


_FX_FILTER = _DropFxTracingNotice()


def ignore_known_harmless_warnings() -> None:
    """Filter the warnings above in this process (and in the processes it forks); calling it
    again changes nothing."""
    for category, message, module in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    logging.getLogger(_FX_LOGGER).addFilter(_FX_FILTER)
