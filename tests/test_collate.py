"""Dual-view collation on the tiny models of every family: alignment across views and with generate."""

import dataclasses

import pytest
import torch
from PIL import Image

from dopd_vlm.collate import DualViewCollator, check_shared_vocab, extract_responses
from dopd_vlm.data.schema import Sample
from dopd_vlm.families import FAMILIES, VISION_FAMILIES
from dopd_vlm.models import load_model, load_processor, vision_special_token_ids
from dopd_vlm.rollout import eos_token_ids
from dopd_vlm.scoring import output_head, response_hidden_states, token_logprobs

TEMPLATE = "Boxes:\n{privileged}\n{question}"


def image(seed: int, size=(112, 112)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def samples_for(family: str) -> list[Sample]:
    if family not in VISION_FAMILIES:
        return [
            Sample("t0", "How many shapes are there?", "2", "red circle [1, 2, 3, 4]\nblue square [5, 6, 7, 8]", ()),
            Sample("t1", "What colour is the circle?", "red", "red circle [10, 20, 30, 40]", ()),
        ]
    return [
        Sample("v0", "How many shapes?", "1", "red circle [10, 10, 40, 40]", (image(0),)),
        Sample("v1", "Which image has more shapes?", "first", "a: red square [1, 1, 5, 5]\nb: none",
               (image(1), image(2, (56, 84)))),
        Sample("v2", "Say yes.", "yes", "the answer is yes", ()),  # no image in a VL batch
    ]


@pytest.fixture(scope="module")
def loaded(tiny_pairs):
    cache = {}

    def get(family):
        if family not in cache:
            paths = tiny_pairs[family]
            student, teacher = load_model(paths["student"]), load_model(paths["teacher"])
            student.eval(), teacher.eval()
            processor = load_processor(paths["student"])
            collator = DualViewCollator(processor, load_processor(paths["teacher"]), privileged_template=TEMPLATE, max_privileged_tokens=0)
            cache[family] = (student, teacher, collator)
        return cache[family]

    return get


def sample_with_logits(model, collator, samples, seed=0, max_new_tokens=10, privileged=False):
    """Sampled responses plus the log-probs generate itself assigned to them (raw logits), from the
    plain prompts or, with `privileged`, the prompts with p (a vision batch's padding row left out)."""
    batch = collator.rollout_batch(samples, privileged)
    tokenizer = collator.tokenizer
    torch.manual_seed(seed)
    out = model.generate(
        **batch, do_sample=True, top_k=0, max_new_tokens=max_new_tokens,
        suppress_tokens=vision_special_token_ids(tokenizer) or None,
        eos_token_id=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
        output_logits=True, return_dict_in_generate=True,
    )
    ids, mask = extract_responses(out.sequences, batch["input_ids"].shape[1], eos_token_ids(model, tokenizer),
                                  tokenizer.pad_token_id)
    logits = torch.stack(out.logits, dim=1).float()
    logprobs = logits.log_softmax(-1).gather(-1, ids[:, : logits.shape[1], None]).squeeze(-1)
    rows = len(samples)
    return ids[:rows], mask[:rows], logprobs[:rows]


def view_logprobs(model, view, ids, mask):
    hidden = response_hidden_states(model, view, mask)
    vocab = model.get_output_embeddings().weight.shape[0]
    return token_logprobs(hidden, output_head(model, vocab), ids[mask], chunk_size=7)


@pytest.mark.parametrize("family", FAMILIES)
def test_student_view_scores_equal_generate_scores(family, loaded):
    student, _, collator = loaded(family)
    samples = samples_for(family)
    ids, mask, generated = sample_with_logits(student, collator, samples)
    assert mask.any(dim=1).all()
    views = collator.scoring_views(samples, ids, mask)
    with torch.no_grad():
        rescored = view_logprobs(student, views.student, ids, mask)
    torch.testing.assert_close(rescored, generated[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_views_align_response_tokens_and_never_point_at_image_tokens(family, loaded):
    student, _, collator = loaded(family)
    samples = samples_for(family)
    ids, mask, _ = sample_with_logits(student, collator, samples, seed=1)
    views = collator.scoring_views(samples, ids, mask)
    image_pad = collator.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    prompt_lengths = []
    for view in (views.student, views.privileged_student, views.teacher):
        rows, steps = mask.nonzero(as_tuple=True)
        target_positions = view.logit_index[rows, steps] + 1
        assert torch.equal(view.inputs["input_ids"][rows, target_positions], ids[mask])
        assert (view.inputs["attention_mask"][rows, target_positions] == 1).all()
        if "mm_token_type_ids" in view.inputs:
            assert (view.inputs["mm_token_type_ids"][rows, target_positions] == 0).all()
            assert (view.inputs["mm_token_type_ids"] == 1).sum() == (view.inputs["input_ids"] == image_pad).sum()
        prompt_lengths.append(view.logit_index[:, 0] + 1)
    # the privileged views carry p, so their prompts are longer and response offsets differ
    assert (prompt_lengths[1] > prompt_lengths[0]).all()
    assert torch.equal(prompt_lengths[1], prompt_lengths[2])


@pytest.mark.parametrize("family", FAMILIES)
def test_privileged_views_score_the_same_batched_alone_and_left_padded(family, loaded):
    student, teacher, collator = loaded(family)
    samples = samples_for(family)
    ids, mask, _ = sample_with_logits(student, collator, samples, seed=2)
    with torch.no_grad():
        batched = collator.scoring_views(samples, ids, mask)
        left = collator.scoring_views(samples, ids, mask, padding_side="left")
        for model, name in ((student, "privileged_student"), (teacher, "teacher"), (student, "student")):
            together = view_logprobs(model, getattr(batched, name), ids, mask)
            left_padded = view_logprobs(model, getattr(left, name), ids, mask)
            alone = torch.cat([
                view_logprobs(model, getattr(collator.scoring_views([s], ids[b : b + 1], mask[b : b + 1]), name),
                              ids[b : b + 1], mask[b : b + 1])
                for b, s in enumerate(samples)
            ])
            torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(together, left_padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_a_vision_batch_without_images_runs_the_vision_tower_on_a_padding_row_that_counts_for_nothing(family, loaded):
    # ZeRO-3 makes every vision-tower call a collective: a text-only micro-batch must still run it,
    # forward and backward, while the padding row changes no score and no gradient.
    student, _, collator = loaded(family)
    texts = [Sample("t0", "Say yes.", "yes", "the answer is yes", ()), Sample("t1", "Name a colour.", "red", "red", ())]
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 5]]), torch.tensor([[True, True, True], [True, True, False]])
    rollout = collator.rollout_batch(texts)
    assert rollout["input_ids"].shape[0] == 3 and rollout["image_grid_thw"].shape[0] == 1
    view = collator.scoring_views(texts, ids, mask).privileged_student
    assert view.inputs["input_ids"].shape[0] == 3 and view.logit_index.shape[0] == 2
    visual = [p for name, p in student.named_parameters() if ".visual." in f".{name}"]
    in_visual = {id(p) for p in visual}
    assert visual
    student.zero_grad()
    hidden = response_hidden_states(student, view, mask)
    hidden.square().sum().backward()
    assert all(p.grad is not None for p in visual)  # the vision tower was in the graph ...
    assert all(not p.grad.any() for p in visual)  # ... and got an exactly zero gradient
    language = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None and id(p) not in in_visual}
    alone = torch.cat([response_hidden_states(student, collator.scoring_views([s], ids[b : b + 1], mask[b : b + 1])
                                              .privileged_student, mask[b : b + 1]) for b, s in enumerate(texts)])
    torch.testing.assert_close(hidden, alone, atol=1e-5, rtol=1e-5)
    images = [samples_for(family)[0], texts[0]]  # a batch with an image gets no padding row
    assert collator.rollout_batch(images)["input_ids"].shape[0] == 2
    student.zero_grad()
    plain = {k: v for k, v in view.inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    width = int(plain["attention_mask"][:2].sum(dim=1).max())
    plain = {k: v[:2, :width] for k, v in plain.items()}
    response_hidden_states(student, dataclasses.replace(view, inputs=plain), mask).square().sum().backward()
    for name, grad in language.items():  # without the padding row: the same language-model gradient
        torch.testing.assert_close(grad, dict(student.named_parameters())[name].grad, atol=1e-6, rtol=1e-5)
    student.zero_grad()


def test_privileged_text_reaches_only_the_privileged_views(loaded):
    _, _, collator = loaded("qwen2_vl")
    sample = samples_for("qwen2_vl")[0]
    assert sample.privileged not in collator.prompt_text(sample, privileged=False)
    assert sample.privileged in collator.prompt_text(sample, privileged=True)
    ids = torch.tensor([[5, 6, 7]])
    views = collator.scoring_views([sample], ids, torch.ones_like(ids, dtype=torch.bool), teacher_privileged=False)
    assert torch.equal(views.teacher.inputs["input_ids"], views.student.inputs["input_ids"])
    none = collator.scoring_views([sample], ids, torch.ones_like(ids, dtype=torch.bool), privileged_student=False, teacher=False)
    assert none.privileged_student is None and none.teacher is None


def test_extract_responses_keeps_first_eos_even_when_it_is_the_pad_token():
    eos = pad = 9
    sequences = torch.tensor([
        [1, 1, 4, 5, 9, 9, 9],  # EOS == pad: first 9 counts, the rest is padding
        [0, 1, 4, 9, 3, 9, 9],  # tokens after the first EOS never count
        [1, 1, 4, 5, 6, 7, 8],  # no EOS: cut by max_new_tokens, everything counts
    ])
    ids, mask = extract_responses(sequences, prompt_width=2, eos_token_ids=[eos, 8], pad_token_id=pad)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ids.tolist() == [[4, 5, 9, 9, 9], [4, 9, 9, 9, 9], [4, 5, 6, 7, 8]]


def test_scoring_views_reject_non_prefix_masks(loaded):
    _, _, collator = loaded("qwen3")
    sample = samples_for("qwen3")[0]
    with pytest.raises(ValueError, match="prefix"):
        collator.scoring_views([sample], torch.tensor([[4, 5, 6]]), torch.tensor([[True, False, True]]))


def test_padded_lm_heads_are_sliced_and_real_tokenizer_mismatch_is_an_error(tiny_pairs):
    teacher_proc = load_processor(tiny_pairs["qwen2_vl"]["teacher"])
    student_proc = load_processor(tiny_pairs["qwen2_vl"]["student"])
    teacher_rows = load_model(tiny_pairs["qwen2_vl"]["teacher"]).get_output_embeddings().weight.shape[0]
    student_rows = load_model(tiny_pairs["qwen2_vl"]["student"]).get_output_embeddings().weight.shape[0]
    assert teacher_rows != student_rows
    assert check_shared_vocab(teacher_proc, student_proc, teacher_rows, student_rows) == min(teacher_rows, student_rows)

    other = load_processor(tiny_pairs["qwen3"]["student"])
    other.add_tokens(["<extra_token>"])
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_shared_vocab(other, student_proc, teacher_rows, student_rows)


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_pixel_bounds_apply_to_every_view_and_the_rollout(tiny_pairs, family):
    processor = load_processor(tiny_pairs[family]["student"])
    token_side = 32 if family == "qwen3_vl" else 28  # pixels per visual token, per side
    big = Sample("big", "How many shapes?", "1", "red circle [10, 10, 40, 40]", (image(5, (448, 448)),))
    bounded = DualViewCollator(processor, load_processor(tiny_pairs[family]["teacher"]), privileged_template=TEMPLATE,
                               max_privileged_tokens=0, max_pixels=16 * token_side**2)
    own = DualViewCollator(processor, privileged_template=TEMPLATE, max_privileged_tokens=0)

    def visual_tokens(grid):  # image_grid_thw rows: patches; 2x2 patches make one token
        return int(grid.prod(dim=-1).sum()) // 4

    views = bounded.scoring_views([big], torch.tensor([[7, 8]]), torch.tensor([[True, True]]))
    counts = {visual_tokens(view.inputs["image_grid_thw"]) for view in (views.student, views.privileged_student, views.teacher)}
    counts.add(visual_tokens(bounded.rollout_batch([big])["image_grid_thw"]))
    assert counts == {16}  # the bound, in every view and the rollout
    assert visual_tokens(own.rollout_batch([big])["image_grid_thw"]) == 64  # the tiny processor's own maximum
