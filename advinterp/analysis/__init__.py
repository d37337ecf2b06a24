"""The paper's neuron analysis: unit galleries (Fig. 2) and WordNet semantics (Fig. 10).

Sits after ``metrics`` in the data flow: it pairs real images with an
adversarial set (:func:`open_paired_sets`), records units in one pass over both
(:func:`paired_pass`; :func:`top_pass` for one set), and turns the top-k stores
into galleries with saliency maps (:func:`unit_galleries`), per-unit LC, CS1,
CS2 (:func:`model_semantics`), or both from one pass
(:func:`semantics_and_galleries`). The passes run on one process or split over
``torchrun`` processes, and resume from a checkpoint (:mod:`advinterp.tally`).
"""

from advinterp.analysis.galleries import (
    Galleries,
    UnitGallery,
    plot_unit_gallery,
    select_units,
    unit_galleries,
    write_galleries,
)
from advinterp.analysis.onepass import semantics_and_galleries
from advinterp.analysis.paired import (
    PairedSets,
    Store,
    open_paired_sets,
    pair_sets,
    paired_pass,
    top_pass,
)
from advinterp.analysis.saliency import activation_maps, discrepancy_maps, saliency_maps
from advinterp.analysis.semantics import (
    ModelSemantics,
    model_semantics,
    plot_fig10,
    units_csv,
    write_semantics,
)

__all__ = [
    "PairedSets",
    "open_paired_sets",
    "pair_sets",
    "top_pass",
    "Store",
    "paired_pass",
    "semantics_and_galleries",
    "discrepancy_maps",
    "activation_maps",
    "saliency_maps",
    "Galleries",
    "UnitGallery",
    "select_units",
    "unit_galleries",
    "plot_unit_gallery",
    "write_galleries",
    "ModelSemantics",
    "model_semantics",
    "units_csv",
    "plot_fig10",
    "write_semantics",
]
