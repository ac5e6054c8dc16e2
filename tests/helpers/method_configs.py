"""Every method configuration the loss tests run: each method, each DOPD ablation, regime weighting
and divergence, each vanilla-OPD divergence, plus the top-K variants and temperatures that take
other code paths."""

from dopd_vlm.choices import ABLATIONS, DIVERGENCES, OPD_DIVERGENCES, REGIME_WEIGHTS
from dopd_vlm.config import MethodConfig
from dopd_vlm.methods import METHODS


def method_configs(top_k: int, *, variants: bool = False):
    for name in METHODS:
        yield MethodConfig(name=name, top_k=top_k)
    for ablation in ABLATIONS[1:]:
        yield MethodConfig(name="dopd", ablation=ablation, top_k=top_k)
    for divergence in OPD_DIVERGENCES:
        yield MethodConfig(name="vanilla_opd", opd_divergence=divergence, top_k=top_k)
    for weights in REGIME_WEIGHTS[1:]:
        yield MethodConfig(name="dopd", regime_weights=weights, top_k=top_k)
    for divergence in DIVERGENCES[1:]:
        yield MethodConfig(name="dopd", divergence=divergence, top_k=top_k)
    if variants:
        for variant in ("renormalized", "tail"):
            yield MethodConfig(name="dopd", topk_variant=variant, top_k=top_k)
        yield MethodConfig(name="dopd", top_k=top_k, temperature=2.0)
        yield MethodConfig(name="vanilla_opd", opd_divergence="sampled", temperature=0.5)


def config_id(cfg: MethodConfig) -> str:
    return (f"{cfg.name}-{cfg.ablation}-{cfg.regime_weights}-{cfg.divergence}-{cfg.opd_divergence}-"
            f"{cfg.topk_variant}-T{cfg.temperature}")
