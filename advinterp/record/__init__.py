"""Record what units of named layers respond to images, through forward hooks.

``Recorder(model, "conv")`` hooks every conv layer of ``model.net``; each
forward pass leaves ``layer → N×C`` unit responses (spatial max by default).
The model's own code is never forked or changed.
"""

from advinterp.record.hooks import (
    REDUCTIONS,
    Recorder,
    check_reduction,
    reduce_map,
    resolve_layers,
)

__all__ = ["Recorder", "resolve_layers", "check_reduction", "reduce_map", "REDUCTIONS"]
