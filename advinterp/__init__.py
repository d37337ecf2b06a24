"""advinterp: interpretability analysis of deep networks with adversarial examples.

Implements Dong, Su & Zhu, "Interpretability Analysis of Deep Neural Networks
With Adversarial Examples" (2022): attacks, unit recording, the WordNet metrics,
Network Dissection on real and adversarial images, and consistency training.
"""

from advinterp.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
