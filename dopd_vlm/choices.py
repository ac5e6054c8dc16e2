"""The pipeline's options with a fixed set of values, each defined once.

`config.py` annotates its fields with these `Literal` types (`validation.build` rejects any other
value with a one-line error) and the modules that act on an option import its type from here, so
the config imports none of them and they import the config only for its dataclasses. The meaning
of each value is in the config field's docstring and in the module that acts on it. Choices only
the config reads (`model.dtype`, `method.privileged_target`, ...) stay in `config.py`; lists that
are rows of a table are that table's keys (`families.FAMILY_INFO`, `testbeds.TESTBEDS`).
"""

from __future__ import annotations

import typing
from typing import Literal

# method.name: the rows of methods.METHODS (tests/test_methods.py keeps the two equal)
MethodName = Literal["dopd", "vanilla_opd", "opsd", "gkd", "sft"]
# method.ablation, method.regime_weights, method.divergence: DOPD's options (methods.dopd)
Ablation = Literal["none", "no_routing", "no_teacher", "no_student"]
RegimeWeights = Literal["paper", "equal", "ht_only"]
Divergence = Literal["routed", "topk_rkl", "js", "reverse_kl"]
# method.opd_divergence: vanilla OPD's divergence (methods.vanilla_opd)
OpdDivergence = Literal["sampled", "topk", "full"]
# method.topk_variant (divergences.topk_reverse_kl)
TopKVariant = Literal["unbiased", "renormalized", "tail"]
# method.normalize (router.compute_thresholds), method.token_drop (router.kept_tokens)
Normalization = Literal["none", "minmax", "zscore"]
TokenDrop = Literal["none", "top", "random", "bottom"]
# train.loss_path (head_loss.use_fused)
LossPath = Literal["auto", "fused", "chunked"]
# data.special_tokens (collate.DualViewCollator)
SpecialTokenPolicy = Literal["reject", "escape"]

METHOD_NAMES = typing.get_args(MethodName)
ABLATIONS = typing.get_args(Ablation)
REGIME_WEIGHTS = typing.get_args(RegimeWeights)
DIVERGENCES = typing.get_args(Divergence)
OPD_DIVERGENCES = typing.get_args(OpdDivergence)
TOPK_VARIANTS = typing.get_args(TopKVariant)
NORMALIZATIONS = typing.get_args(Normalization)
TOKEN_DROPS = typing.get_args(TokenDrop)
