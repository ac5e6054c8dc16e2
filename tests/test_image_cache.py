"""Reusing preprocessed images changes nothing in what the collator builds."""

import torch

from dopd_vlm import image_cache
from dopd_vlm.collate import DualViewCollator
from dopd_vlm.data.recipes import load_recipe
from dopd_vlm.models import load_processor


def _views(collator, samples):
    ids = torch.full((len(samples), 3), 5)
    mask = torch.ones_like(ids, dtype=torch.bool)
    views = collator.scoring_views(samples, ids, mask)
    return [collator.rollout_batch(samples)] + [v.inputs for v in (views.student, views.privileged_student, views.teacher)]


def test_cached_preprocessing_is_identical_and_hits(tiny_pairs):
    processor = load_processor(tiny_pairs["qwen2_vl"]["student"])
    samples = load_recipe("synthetic_scenes", "test", family="qwen2_vl", limit=3)
    repeated = [s for s in samples for _ in range(2)]  # rollouts repeat each prompt's image
    collator = DualViewCollator(processor, privileged_template="{privileged}\n{question}", max_privileged_tokens=0)

    image_cache.CACHE.clear()
    hits_before = image_cache.CACHE.hits
    cached = _views(collator, repeated)
    assert image_cache.CACHE.hits - hits_before >= 4 * len(repeated) - len(samples)

    inner = processor.image_processor
    assert not isinstance(inner, image_cache._CachingImageProcessor)  # restored after each call
    plain = []
    for batch in [processor(text=["<|vision_start|><|image_pad|><|vision_end|>x"] * len(repeated),
                            images=[s.images[0] for s in repeated], return_tensors="pt")]:
        with image_cache.reuse(processor):
            again = processor(text=["<|vision_start|><|image_pad|><|vision_end|>x"] * len(repeated),
                              images=[s.images[0] for s in repeated], return_tensors="pt")
        for key in batch:
            assert torch.equal(batch[key], again[key]), key
        plain.append(batch)
    for view in cached:
        assert view["pixel_values"].shape[0] == plain[0]["pixel_values"].shape[0]
        assert torch.equal(view["pixel_values"], plain[0]["pixel_values"])
        assert torch.equal(view["image_grid_thw"], plain[0]["image_grid_thw"])


def test_other_inputs_fall_back_to_the_processor(tiny_pairs):
    processor = load_processor(tiny_pairs["qwen2_vl"]["student"])
    image = load_recipe("synthetic_scenes", "test", family="qwen2_vl", limit=1)[0].images[0]
    with image_cache.reuse(processor):
        single = processor.image_processor(image, return_tensors="pt")  # not a list: uncached path
    assert torch.equal(single["pixel_values"], processor.image_processor(image, return_tensors="pt")["pixel_values"])
