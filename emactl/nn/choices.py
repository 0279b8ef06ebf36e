"""The EMA unit's named choices, defined once.

:mod:`emactl.nn.ema` checks its arguments against these tuples, the recipe's ``Literal`` fields
(:class:`emactl.config.EMAConfig`) are built from them, and ``emactl ablate`` parses its axes
with them. This module imports nothing, so the recipe and the CLI can read the choices without
importing torch.
"""
from __future__ import annotations

NORMS = ("l2", "layernorm", "none")  # how each basis is normalised over the channels
GRAD_MODES = ("none", "last", "full")  # which EM iterations back-propagate
BASES_UPDATES = ("moving_average", "normed_moving_average", "backprop", "none")  # how the initial bases evolve
AVERAGED = ("moving_average", "normed_moving_average")  # the updates that keep a moving average
METHODS = ("auto", "bmm", "blocked", "conv", "onednn")  # how iterations without gradient run (em_cpu)
