"""Record what units of named layers respond to images, through forward hooks.

``Recorder(model)`` hooks every unit of ``model.net`` where the network uses it
(after batch norm and nonlinearity; ``"conv"`` for the raw conv outputs); each
forward pass leaves ``layer → N×C`` unit responses (spatial max by default).
The model's own code is never forked or changed.
"""

from advinterp.record.hooks import (
    READOUTS,
    REDUCTIONS,
    Recorder,
    check_reduction,
    reduce_map,
    resolve_layers,
    unit_layers,
)

__all__ = [
    "Recorder",
    "resolve_layers",
    "unit_layers",
    "check_reduction",
    "reduce_map",
    "REDUCTIONS",
    "READOUTS",
]
