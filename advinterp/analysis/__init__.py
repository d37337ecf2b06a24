"""The paper's neuron analysis: unit galleries (Fig. 2) and WordNet semantics (Fig. 10).

Sits after ``metrics`` in the data flow: it pairs real images with an
adversarial set (:func:`open_paired_sets`), records units in one pass per set
(:func:`top_pass`), and turns the top-k stores into galleries with saliency
maps (:func:`unit_galleries`) or per-unit LC, CS1, CS2 (:func:`model_semantics`).
"""

from advinterp.analysis.galleries import (
    Galleries,
    UnitGallery,
    plot_unit_gallery,
    select_units,
    unit_galleries,
    write_galleries,
)
from advinterp.analysis.paired import PairedSets, open_paired_sets, pair_sets, top_pass
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
