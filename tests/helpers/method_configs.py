"""Every method configuration the loss tests run: each method, each DOPD ablation, each vanilla-OPD
divergence, plus the top-K variants and temperatures that take other code paths."""

from dopd_vlm.config import MethodConfig
from dopd_vlm.methods import ABLATIONS, METHODS, OPD_DIVERGENCES


def method_configs(top_k: int, *, variants: bool = False):
    for name in METHODS:
        yield MethodConfig(name=name, top_k=top_k)
    for ablation in ABLATIONS[1:]:
        yield MethodConfig(name="dopd", ablation=ablation, top_k=top_k)
    for divergence in OPD_DIVERGENCES:
        yield MethodConfig(name="vanilla_opd", opd_divergence=divergence, top_k=top_k)
    if variants:
        for variant in ("renormalized", "tail"):
            yield MethodConfig(name="dopd", topk_variant=variant, top_k=top_k)
        yield MethodConfig(name="dopd", top_k=top_k, temperature=2.0)
        yield MethodConfig(name="vanilla_opd", opd_divergence="sampled", temperature=0.5)


def config_id(cfg: MethodConfig) -> str:
    return f"{cfg.name}-{cfg.ablation}-{cfg.opd_divergence}-{cfg.topk_variant}-T{cfg.temperature}"
