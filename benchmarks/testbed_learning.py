"""Learning benchmark on the reasoning testbeds: DOPD (live and initial privileged target),
vanilla OPD, SFT, OPSD, GKD and the token ablation of vanilla OPD (the paper's Fig. 4), over
several seeds, on the test split and out of distribution (longer chains).

    python benchmarks/testbed_learning.py                              # arithmetic, the shipped pair
    python benchmarks/testbed_learning.py --testbed cells              # the vision testbed
    python benchmarks/testbed_learning.py --rebuild                    # warm a pair up with today's code
    python benchmarks/testbed_learning.py --testbed arithmetic_hidden --rebuild --ship   # and ship it
    python benchmarks/testbed_learning.py --seeds 0 1 2 --steps 100 --teacher T --student S
    python benchmarks/testbed_learning.py --update-md                  # BENCHMARKS.md from results

The testbeds (`TESTBEDS`), each a config naming its recipe, prompt template and shipped pair:
- `arithmetic` (configs/testbed_arithmetic.yaml, text, tiny Qwen3): mod-10 chains written in
  steps of two operations, p = the first step's value (never the final answer);
- `arithmetic_hidden`, `arithmetic_rule` (configs/testbed_arithmetic_{hidden,rule}.yaml): the same
  chains with another kind of p (issue 24): half the problems hide one operand, p = its value (an
  information gap); or a-b means b-a in every problem, p = that rule (a shared rule). Their pairs
  continue the arithmetic pair's warm-ups on their recipe;
- `cells` (configs/testbed_cells.yaml, vision, tiny Qwen2-VL): the same chains with the operands
  as coloured cells in the image, p = the cells' digits (what the image shows, nothing computed).
Teacher and student are of the same size and differ only by their supervised warm-up on the
reference chains (`dopd_vlm.lab.warmup`, `Testbed.warmups`). By default the pair shipped in
demo_assets/ (the one every recorded setting used); `--rebuild` warms one up with today's code,
`--teacher/--student` use given checkpoints (recorded in the results). Every method sees the
same checkpoints, data and p; the seed changes the trainer's data order and rollouts.

Measured once (greedy, so the same for every run): the preconditions -- student accuracy plain
and with p, teacher plain and with p, both plain out of distribution, the student's greedy
response length. Per run: final test and OOD accuracy (the OOD one of the exported final
student), the gap recovered (final - student) / (teacher - student) against the plain-view
teacher and, where p holds information the question lacks (`arithmetic_hidden`), also against the
p-free ceiling (the best accuracy any answerer without p can expect, exact from the test split's
problems: `arithmetic_chains.p_free_ceiling`), the run's step-0 student accuracies (a check that every run starts from the same
student), HT / HS shares, entropy and KL to the teacher (means, and per step for the plot) and
rollout response length. Raw per-run rows go to benchmarks/results/testbed_<testbed>_<setting>.json
after every run, so an interrupted benchmark keeps what it measured, and a rerun of a setting only
adds the (method, seed) runs it lacks; the plot goes next to it (.png). `--update-md` rewrites
the testbed's section of BENCHMARKS.md (and nothing else) from every stored setting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, ROOT, machine, mean_std, repo_relative, write_section  # noqa: E402

from dopd_vlm.lab.demo import gap_recovered  # noqa: E402
from dopd_vlm.lab.testbeds import TESTBEDS, Testbed  # noqa: E402
from dopd_vlm.lab.tiny import exclusive_lock  # noqa: E402

METHODS = {
    "dopd_live": ["method.name=dopd", "method.privileged_target=live"],
    "dopd_initial": ["method.name=dopd", "method.privileged_target=initial"],
    "vanilla_opd": ["method.name=vanilla_opd"],
    "sft": ["method.name=sft"],
    "opd_drop_top20": ["method.name=vanilla_opd", "method.token_drop=top", "method.token_drop_fraction=0.2"],
    "opd_drop_random20": ["method.name=vanilla_opd", "method.token_drop=random", "method.token_drop_fraction=0.2"],
    "opd_drop_bottom20": ["method.name=vanilla_opd", "method.token_drop=bottom", "method.token_drop_fraction=0.2"],
    "opsd_live": ["method.name=opsd", "method.privileged_target=live"],
    "opsd_initial": ["method.name=opsd", "method.privileged_target=initial"],
    "gkd": ["method.name=gkd"],
    "dopd_initial_zscore": ["method.name=dopd", "method.privileged_target=initial", "method.normalize=zscore"],
    "dopd_initial_minmax": ["method.name=dopd", "method.privileged_target=initial", "method.normalize=minmax"],
    "dopd_no_student": ["method.name=dopd", "method.ablation=no_student"],  # DOPD's weights, every regime to the teacher
    "dopd_ht_only": ["method.name=dopd", "method.regime_weights=ht_only"],  # only HT tokens carry loss (the paper's Table 6)
}
MIN_GAP = 0.05  # the smallest teacher-student gap a gap recovered is reported for (~1.5 standard errors at 200 samples)
SERIES = ("share/HT", "share/HS", "entropy", "kl_to_teacher")  # per-step diagnostics kept and plotted


def findings_file(testbed: Testbed) -> Path:
    return ROOT / "benchmarks" / f"testbed_{testbed.name}_findings.md"


def result_path(testbed: Testbed, setting: str, results: Path = RESULTS) -> Path:
    return results / f"testbed_{testbed.name}_{setting}.json"


def setting_files(testbed: Testbed, results: Path = RESULTS) -> list[Path]:
    """The testbed's stored settings (`testbed_arithmetic_*` also matches its variants' files)."""
    return [file for file in sorted(results.glob(f"testbed_{testbed.name}_*.json"))
            if json.loads(file.read_text()).get("testbed", "arithmetic") == testbed.name]


# -- the warmed pair --------------------------------------------------------------------------


def prepare_pair(testbed: Testbed, cache: Path) -> dict[str, Path]:
    """The warmed-up teacher and student, from `cache` if a previous call built the same spec."""
    import torch

    from dopd_vlm.lab.tiny import make_tiny_pair

    teacher_size, student_size = testbed.sizes()
    teacher_cfg, student_cfg = testbed.warmups()
    initial = testbed.initial_pair()
    spec = {"recipe": testbed.recipe, "template": testbed.template, "teacher_size": asdict(teacher_size),
            "student_size": asdict(student_size), "teacher_warmup": asdict(teacher_cfg),
            "student_warmup": asdict(student_cfg), "torch": torch.__version__}
    if initial:  # a variant: the base pair's weights (by hash) and the student's plain-view recipe
        spec.update(base={role: weights_sha256(path) for role, path in initial.items()},
                    student_plain_recipe=testbed.student_plain_recipe)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache / key
    targets = {"teacher": folder / "teacher", "student": folder / "student"}
    if not initial:  # both from the same initial weights (the pair's teacher): they differ by their warm-ups alone
        fresh = make_tiny_pair(testbed.family, folder / "init", teacher=teacher_size, student=student_size)["teacher"]
        initial = {"teacher": fresh, "student": fresh}
    for role, cfg in (("teacher", teacher_cfg), ("student", student_cfg)):
        if not (targets[role] / "manifest.json").is_file():
            print(f"warming up the {role}: {cfg.steps} steps of {cfg.batch_size} (cached in {targets[role]})", flush=True)
            plain_recipe = testbed.student_plain_recipe if role == "student" else ""
            warm_and_save(testbed, initial[role], targets[role], cfg, spec, plain_recipe)
    return targets


def warm_and_save(testbed: Testbed, base: Path, target: Path, cfg, spec: dict, plain_recipe: str = "") -> None:
    """Warm `base` up on the testbed's recipe (the plain view on `plain_recipe`'s rows if given)
    and save it to `target` with a manifest.json of the spec."""
    import torch

    from dopd_vlm.data import load_recipe
    from dopd_vlm.lab.warmup import warm_up

    model, collator = load_checkpoint(testbed, base, train=True)
    torch.set_num_threads(1)  # float reductions depend on the thread count
    started = time.perf_counter()
    plain = load_recipe(plain_recipe, "train", family=testbed.family) if plain_recipe else None
    losses = warm_up(model, collator, load_recipe(testbed.recipe, "train", family=testbed.family), cfg,
                     plain_samples=plain, progress=False)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    collator.processor.save_pretrained(tmp)
    manifest = {"spec": spec, "warmup_seconds": round(time.perf_counter() - started), "final_loss": losses[-1]}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, target)


def weights_sha256(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


def ship_pair(testbed: Testbed, pair: dict[str, Path], pre: dict[str, float]) -> None:
    """Copy a warmed pair to where the testbed's config points (demo_assets/), each with the
    warmup_manifest.json the tests check: the settings that made it, its SHA-256, its accuracies."""
    import shutil

    teacher_cfg, student_cfg = testbed.warmups()
    base = testbed.initial_pair()
    for role, cfg in (("teacher", teacher_cfg), ("student", student_cfg)):
        target = testbed.shipped_pair()[role]
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(pair[role], target, ignore=shutil.ignore_patterns("manifest.json"))
        size = testbed.size
        plain = testbed.student_plain_recipe if role == "student" else ""
        manifest = {
            "what": f"the {testbed.name} testbed's {role} ({testbed.config.relative_to(ROOT)}): tiny {testbed.family}, "
                    f"hidden {size['hidden_size']}, {size['num_layers']} layers, {size['num_heads']} heads, intermediate "
                    f"{size['intermediate_size']}, 500-token vocabulary, float32",
            "built_by": (f"dopd_vlm.lab.warmup.warm_up on the {testbed.recipe} recipe's reference chains, p shown "
                         f"{cfg.privileged_prob:.0%} of the time" + (f", the plain view on the {plain} recipe's rows" if plain else "")
                         + (f", from the {testbed.base} testbed's shipped {role}" if base else ", from fresh tiny weights")
                         + f", one CPU thread: python benchmarks/testbed_learning.py --testbed {testbed.name} --rebuild --ship"),
            **({"base_sha256": weights_sha256(base[role])} if base else {}),
            "warmup": asdict(cfg),
            **({"plain_view_recipe": plain} if plain else {}),
            "accuracy_greedy_200_samples": {"test": pre[f"{role}/plain"], "test_with_p": pre[f"{role}/with_p"],
                                            "ood": pre[f"{role}/ood"]},
            "sha256": weights_sha256(target),
            "used_by": f"BENCHMARKS.md '{testbed.section}'",
        }
        (target / "warmup_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def load_checkpoint(testbed: Testbed, checkpoint: Path, train: bool = False):
    """(model, collator) of a checkpoint, prompted as the testbed's config prompts it."""
    import torch

    from dopd_vlm.collate import DualViewCollator
    from dopd_vlm.models import load_model, load_processor

    model = load_model(checkpoint, dtype=torch.float32)
    collator = DualViewCollator(load_processor(checkpoint), privileged_template=testbed.template, max_privileged_tokens=0)
    return (model if train else model.eval()), collator


def greedy_accuracy(testbed: Testbed, loaded, split: str, eval_samples: int, privileged: bool = False) -> float:
    """Greedy accuracy of a loaded (model, collator) on a split, as the trainer's evaluation computes it."""
    from dopd_vlm.data import load_recipe
    from dopd_vlm.evaluate import evaluate_accuracy

    model, collator = loaded
    samples = load_recipe(testbed.recipe, split, family=testbed.family, limit=eval_samples or None)
    return evaluate_accuracy(model, collator, samples, max_new_tokens=testbed.max_new_tokens, batch_size=100,
                             privileged=privileged, extractor=samples.answer_extractor).accuracy


def where_p_matters(testbed: Testbed, samples) -> list[bool] | None:
    """Per test sample of a variant: whether its answer needs what p says (the question hides an
    operand, or the rule changes the answer from the base testbed's); None for a testbed that is
    no variant."""
    if not testbed.base:
        return None
    from dopd_vlm.data import load_recipe

    base = load_recipe(TESTBEDS[testbed.base].recipe, samples.split, family=testbed.family, limit=len(samples))
    return [s.meta.get("hidden_position", -1) >= 0 or s.answer != b.answer for s, b in zip(samples, base)]


def subset_accuracy(testbed: Testbed, loaded, eval_samples: int, privileged: bool = False) -> dict[str, float]:
    """Greedy test accuracy where p matters and elsewhere (`where_p_matters`); {} for a testbed that is no variant."""
    from dopd_vlm.data import load_recipe
    from dopd_vlm.evaluate import evaluate_accuracy

    samples = load_recipe(testbed.recipe, "test", family=testbed.family, limit=eval_samples or None)
    matters = where_p_matters(testbed, samples)
    if matters is None:
        return {}
    model, collator = loaded
    out = {}
    for name, keep in (("where_p_matters", True), ("elsewhere", False)):
        subset = [s for s, m in zip(samples, matters) if m == keep]
        out[name] = evaluate_accuracy(model, collator, subset, max_new_tokens=testbed.max_new_tokens, batch_size=100,
                                      privileged=privileged, extractor=samples.answer_extractor).accuracy
    return out


def subset_preconditions(testbed: Testbed, pair: dict[str, Path], eval_samples: int) -> dict[str, float]:
    """Both models' accuracy plain and with p where p matters and elsewhere, the share of such
    problems and their p-free ceiling ({} for a testbed that is no variant)."""
    from dopd_vlm.data import load_recipe

    test = load_recipe(testbed.recipe, "test", family=testbed.family, limit=eval_samples or None)
    matters = where_p_matters(testbed, test)
    if matters is None:
        return {}
    out = {"share_where_p_matters": sum(matters) / len(matters),
           "p_free_ceiling/where_p_matters": statistics.fmean(s.meta.get("p_free_ceiling", 1.0)
                                                              for s, m in zip(test, matters) if m)}
    for role, path in pair.items():
        loaded = load_checkpoint(testbed, path)
        for view, privileged in (("plain", False), ("with_p", True)):
            for subset, accuracy in subset_accuracy(testbed, loaded, eval_samples, privileged).items():
                out[f"{role}/{view}/{subset}"] = accuracy
    return out


def preconditions(testbed: Testbed, pair: dict[str, Path], eval_samples: int) -> dict[str, float]:
    """Greedy accuracy of both models on the test split plain and with p and on the
    out-of-distribution split plain, and the student's response length."""
    from dopd_vlm.config import RolloutConfig
    from dopd_vlm.data import load_recipe
    from dopd_vlm.rollout import sample_responses

    test = load_recipe(testbed.recipe, "test", family=testbed.family, limit=eval_samples or None)
    out: dict[str, float] = {}
    for role, path in pair.items():
        loaded = load_checkpoint(testbed, path)
        for view, privileged in (("plain", False), ("with_p", True)):
            out[f"{role}/{view}"] = greedy_accuracy(testbed, loaded, "test", eval_samples, privileged)
        out[f"{role}/ood"] = greedy_accuracy(testbed, loaded, "ood", eval_samples)
        if role == "student":
            model, collator = loaded
            _, mask = sample_responses(model, collator, list(test),
                                       RolloutConfig(num_rollouts=1, max_new_tokens=testbed.max_new_tokens), greedy=True)
            out["student/response_tokens"] = float(mask.sum(1).float().mean())
    tokenizer = loaded[1].tokenizer  # the pair shares one tokenizer
    out["reference_tokens"] = statistics.fmean(len(tokenizer(s.reference)["input_ids"]) + 1 for s in test)
    if all("p_free_ceiling" in s.meta for s in test):  # the best accuracy any p-free answerer can expect
        out["p_free_ceiling"] = statistics.fmean(s.meta["p_free_ceiling"] for s in test)
    return {**out, **subset_preconditions(testbed, pair, eval_samples)}


# -- runs ---------------------------------------------------------------------------------------


def run_one(testbed: Testbed, method: str, seed: int, args, pair: dict[str, Path], recipe: Path, out: Path) -> dict:
    """One `dopd-vlm train` run; its summary from metrics.jsonl. The run starts afresh
    (`--overwrite`): it runs only because the setting's results do not hold it, so its folder, if
    any, is what an interrupted or failed try left."""
    run_dir = out / f"seed{seed}" / method
    command = [
        sys.executable, "-m", "dopd_vlm", "train", "--overwrite", "--config", str(testbed.config),
        f"model.teacher={pair['teacher']}", f"model.student={pair['student']}", f"data.recipe={recipe}",
        f"data.max_eval_samples={args.eval_samples}", f"train.steps={args.steps}", f"train.seed={seed}",
        f"train.output_dir={run_dir}", *METHODS[method], *args.overrides,
    ]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(f"{run_dir}.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    row = {"method": method, "seed": seed, "rc": code, "seconds": round(time.perf_counter() - started),
           "command": " ".join(command[1:])}
    if code == 0:
        row.update(summarize_run(testbed, run_dir, args.eval_samples))
    return row


def summarize_run(testbed: Testbed, run_dir: Path, eval_samples: int, final_ood: float | None = None,
                  final_subsets: dict | None = None) -> dict:
    """`summarize_metrics` of the run's metrics.jsonl, and its final student's OOD accuracy and,
    on a variant, test accuracy where p matters and elsewhere (measured unless given)."""
    summary = summarize_metrics([json.loads(line) for line in open(run_dir / "metrics.jsonl")])
    if final_ood is None or final_subsets is None:
        loaded = load_checkpoint(testbed, run_dir / "final")
        final_ood = greedy_accuracy(testbed, loaded, "ood", eval_samples) if final_ood is None else final_ood
        final_subsets = subset_accuracy(testbed, loaded, eval_samples) if final_subsets is None else final_subsets
    summary["final_ood"] = final_ood
    summary.update({f"final_{name}": value for name, value in final_subsets.items()})
    return summary


def summarize_metrics(rows: list[dict]) -> dict:
    """Final and step-0 accuracies, and step means of the routing and length diagnostics."""
    start = next(r for r in rows if r["step"] == 0)
    final = [r for r in rows if r["step"] > 0 and "student/test" in r][-1]
    steps = [r for r in rows if r["step"] > 0 and "loss" in r]
    summary = {"final_test": final["student/test"], "start_test": start["student/test"],
               "start_test_with_p": start.get("student_privileged/test"), "first_loss": steps[0]["loss"]}
    for key in ("share/HT", "share/HS", "entropy", "response_length", "kl_to_teacher"):
        values = [r[key] for r in steps if key in r]
        if values:
            summary[f"mean_{key}"] = statistics.fmean(values)
            summary[f"last20_{key}"] = statistics.fmean(values[-20:])
    summary["series"] = {key: [round(r[key], 5) for r in steps] for key in SERIES if all(key in r for r in steps)}
    return summary


def write_recipe(testbed: Testbed, out: Path, train_rows: int) -> Path:
    """The built-in recipe with `train_rows` training rows (rows are a function of their index,
    so these are the first rows of the warm-ups' split)."""
    import yaml

    from dopd_vlm.data.recipes import RECIPES_DIR

    recipe = yaml.safe_load((RECIPES_DIR / f"{testbed.recipe}.yaml").read_text())
    recipe["splits"] = {**recipe["splits"], "train": train_rows}
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# -- aggregation ---------------------------------------------------------------------------------


def aggregate(rows: list[dict], pre: dict[str, float]) -> dict[str, dict]:
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        done = [r for r in rows if r["method"] == method and r["rc"] == 0]
        if not done:
            continue
        finals = [r["final_test"] for r in done]
        gaps = [gap_recovered(f, pre["student/plain"], pre["teacher/plain"]) for f in finals]
        out[method] = {"seeds": [r["seed"] for r in done], "final": mean_std(finals), "gap": mean_std(gaps)}
        if has_information_gap(pre):  # the gap to what a p-free student can reach at best
            out[method]["gap_ceiling"] = mean_std([gap_recovered(f, pre["student/plain"], pre["p_free_ceiling"])
                                                   for f in finals])
        if all("final_ood" in r for r in done) and "student/ood" in pre:
            oods = [r["final_ood"] for r in done]
            out[method]["ood"] = mean_std(oods)
            if pre["teacher/ood"] - pre["student/ood"] >= MIN_GAP:  # else the ratio is noise over noise
                out[method]["ood_gap"] = mean_std([gap_recovered(f, pre["student/ood"], pre["teacher/ood"])
                                                   for f in oods])
        for subset in ("where_p_matters", "elsewhere"):
            if all(f"final_{subset}" in r for r in done):
                out[method][subset] = mean_std([r[f"final_{subset}"] for r in done])
        for key in ("start_test", "start_test_with_p", "first_loss", "mean_share/HT", "mean_share/HS",
                    "mean_entropy", "last20_entropy", "mean_response_length", "last20_kl_to_teacher"):
            values = [r[key] for r in done if key in r]
            if values:
                out[method][key] = statistics.fmean(values)
    return out


def has_information_gap(pre: dict[str, float]) -> bool:
    """Whether part of what the answers need is only in p (the p-free ceiling is below 1)."""
    return pre.get("p_free_ceiling", 1.0) < 1.0 - 1e-9


def format_table(agg: dict[str, dict]) -> str:
    ceiling = any("gap_ceiling" in a for a in agg.values())  # a column only where p hides information
    lines = ["| method | seeds | start (plain / with p) | final test acc. | gap recovered | "
             + ("gap to the p-free ceiling | " if ceiling else "") + "final OOD acc. | "
             "OOD gap recovered | HT share | HS share | entropy (mean / last 20) | KL to teacher (last 20) | "
             "rollout tokens | step-1 loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if ceiling else "")]
    for method, a in agg.items():
        def pct(key):
            return f"{a[key]:.3f}" if key in a else "-"

        ood = f"{a['ood'][0]:.3f} ± {a['ood'][1]:.3f}" if "ood" in a else "-"
        ood_gap = f"{100 * a['ood_gap'][0]:.0f} % ± {100 * a['ood_gap'][1]:.0f}" if "ood_gap" in a else "-"
        entropy = f"{a['mean_entropy']:.3f} / {a['last20_entropy']:.3f}" if "mean_entropy" in a else "-"
        start = f"{a['start_test']:.3f} / {a['start_test_with_p']:.3f}" if "start_test_with_p" in a else "-"
        to_ceiling = f"{100 * a['gap_ceiling'][0]:.0f} % ± {100 * a['gap_ceiling'][1]:.0f} | " if ceiling else ""
        lines.append(
            f"| {method} | {len(a['seeds'])} | {start} | {a['final'][0]:.3f} ± {a['final'][1]:.3f} | "
            f"{100 * a['gap'][0]:.0f} % ± {100 * a['gap'][1]:.0f} | {to_ceiling}{ood} | {ood_gap} | "
            f"{pct('mean_share/HT')} | {pct('mean_share/HS')} | "
            f"{entropy} | {pct('last20_kl_to_teacher')} | {a.get('mean_response_length', float('nan')):.1f} | "
            f"{pct('first_loss')} |"
        )
    return "\n".join(lines)


def format_subset_table(agg: dict[str, dict], pre: dict[str, float]) -> str:
    """A variant's test accuracy where p matters (the answer needs what p says) and elsewhere:
    the models' at the start, every method's final one ("" where not measured)."""
    if "share_where_p_matters" not in pre:
        return ""
    share = pre["share_where_p_matters"]
    lines = [f"| model / method | where p matters ({100 * share:.0f} % of the test problems; p-free ceiling there "
             f"{pre['p_free_ceiling/where_p_matters']:.3f}) | elsewhere |", "|---|---|---|"]
    for role in ("teacher", "student"):
        for view in ("plain", "with_p"):
            lines.append(f"| {role}, {view.replace('_', ' ')} (start) | {pre[f'{role}/{view}/where_p_matters']:.3f} | "
                         f"{pre[f'{role}/{view}/elsewhere']:.3f} |")
    for method, a in agg.items():
        if "where_p_matters" in a:
            lines.append(f"| {method} (final) | {a['where_p_matters'][0]:.3f} ± {a['where_p_matters'][1]:.3f} | "
                         f"{a['elsewhere'][0]:.3f} ± {a['elsewhere'][1]:.3f} |")
    return "\n".join(lines)


def format_preconditions(pre: dict[str, float], ood_split: str) -> str:
    ood = (f"; out of distribution ({ood_split}, plain): student {pre['student/ood']:.3f}, teacher "
           f"{pre['teacher/ood']:.3f}") if "student/ood" in pre else ""
    ceiling = (f"; best accuracy any p-free answerer can expect (p-free ceiling, exact from the test split) "
               f"{pre['p_free_ceiling']:.3f}") if has_information_gap(pre) else ""
    return (f"student {pre['student/plain']:.3f} plain / {pre['student/with_p']:.3f} with p; "
            f"teacher {pre['teacher/plain']:.3f} plain / {pre['teacher/with_p']:.3f} with p{ceiling}{ood}; "
            f"student greedy response {pre['student/response_tokens']:.1f} tokens "
            f"(reference chains {pre['reference_tokens']:.1f} incl. EOS)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", default="arithmetic", choices=sorted(TESTBEDS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=sorted(METHODS))
    parser.add_argument("--eval-samples", type=int, default=200, help="test samples per evaluation")
    parser.add_argument("--train-rows", type=int, default=20000, help="training rows the runs draw from")
    parser.add_argument("--teacher", default="", help="a warmed teacher instead of the shipped one")
    parser.add_argument("--student", default="", help="a warmed student instead of the shipped one")
    parser.add_argument("--rebuild", action="store_true",
                        help="warm a pair up with today's code (cached under --cache; ~35 CPU-minutes) instead")
    parser.add_argument("--ship", action="store_true",
                        help="with --rebuild: copy the warmed pair to demo_assets/ (where the config points) with its "
                             "manifest, and stop")
    parser.add_argument("--cache", help="warm-up cache (default .cache/testbed_<testbed>)")
    parser.add_argument("--out", help="run folders (default runs/testbed_<testbed>)")
    parser.add_argument("--setting", default="default", help="name of this setting in the results")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the setting's results go (default %(default)s)")
    parser.add_argument("--update-md", action="store_true", help="only rewrite BENCHMARKS.md from stored results")
    parser.add_argument("--resummarize", action="store_true",
                        help="only re-read the setting's finished runs under --out into its results file")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args(argv)
    testbed = TESTBEDS[args.testbed]
    runs = Path(args.out or ROOT / "runs" / f"testbed_{testbed.name}")
    if args.update_md:
        update_markdown(testbed, ROOT / "BENCHMARKS.md")
        return 0
    if args.resummarize:
        resummarize(testbed, result_path(testbed, args.setting, args.results), runs / args.setting, args.eval_samples)
        return 0
    if bool(args.teacher) != bool(args.student):
        parser.error("--teacher and --student go together")
    if args.ship and not args.rebuild:
        parser.error("--ship ships a pair --rebuild warms up")
    if args.teacher:
        pair = {"teacher": Path(args.teacher), "student": Path(args.student)}
    else:
        cache = Path(args.cache or ROOT / ".cache" / f"testbed_{testbed.name}")
        pair = prepare_pair(testbed, cache) if args.rebuild else testbed.shipped_pair()
    if args.ship:
        pre = preconditions(testbed, pair, args.eval_samples)
        ship_pair(testbed, pair, pre)
        print("shipped", *testbed.shipped_pair().values(), "preconditions:", format_preconditions(pre, testbed.ood))
        return 0
    out = runs / args.setting
    out.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(testbed, out, args.train_rows)
    result_file = result_path(testbed, args.setting, args.results)
    record = start_record(testbed, result_file, args, pair)
    print("preconditions:", format_preconditions(record["preconditions"], testbed.ood), flush=True)
    done = {(r["method"], r["seed"]) for r in record["runs"] if r["rc"] == 0}
    for seed in args.seeds:
        for method in args.methods:
            if (method, seed) in done:  # a setting grows by the methods or seeds it lacks
                continue
            row = run_one(testbed, method, seed, args, pair, recipe, out)
            add_run(result_file, record, row)
            print(f"seed {seed} {method}: rc {row['rc']}, {row['seconds']} s, final {row.get('final_test')}", flush=True)
    print(record["table"])
    return 0


def start_record(testbed: Testbed, result_file: Path, args, pair: dict[str, Path]) -> dict:
    """The setting's stored record, to be extended with the same models, steps and overrides, or a new one."""
    models = {k: repo_relative(v) for k, v in pair.items()}
    if result_file.is_file():
        record = json.loads(result_file.read_text())
        stored = (record["models"], record["steps"], record["overrides"])
        if stored != (models, args.steps, args.overrides):
            sys.exit(f"{result_file}: setting {args.setting!r} was run with models, steps, overrides {stored}; "
                     "extend it with the same ones or name a new --setting")
        record["seeds"] = sorted(set(record["seeds"]) | set(args.seeds))
        record["commands"] = [*record.get("commands", [record["command"]]), " ".join(["python", *sys.argv])]
        return record
    return {"testbed": testbed.name, "setting": args.setting, "command": " ".join(["python", *sys.argv]), "machine": machine(),
            "seeds": args.seeds, "steps": args.steps, "overrides": args.overrides, "models": models,
            "preconditions": preconditions(testbed, pair, args.eval_samples), "runs": []}


def add_run(result_file: Path, record: dict, row: dict) -> None:
    """Store one finished run in the setting's file, with the runs other processes stored there
    meanwhile (one setting may run as several processes, e.g. one per seed)."""
    result_file.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(result_file.with_suffix(".lock")):
        if result_file.is_file():
            stored = json.loads(result_file.read_text())
            commands = [*stored.get("commands", [stored["command"]]), *record.get("commands", [record["command"]])]
            record.update(runs=stored["runs"], minutes=stored.get("minutes", 0), commands=list(dict.fromkeys(commands)))
        record["runs"] = [r for r in record["runs"] if (r["method"], r["seed"]) != (row["method"], row["seed"])] + [row]
        record["minutes"] = round(record.get("minutes", 0) + row["seconds"] / 60, 1)
        save_record(result_file, record)


def save_record(result_file: Path, record: dict) -> None:
    record["aggregate"] = aggregate(record["runs"], record["preconditions"])
    record["table"] = format_table(record["aggregate"])
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(record, indent=2) + "\n")
    plot_record(record, result_file.with_suffix(".png"))


def resummarize(testbed: Testbed, result_file: Path, out: Path, eval_samples: int) -> None:
    """Summaries of the stored runs again from their run folders (after the summary grew), and
    what the summary now needs that was not measured yet (the models' and runs' OOD accuracy)."""
    record = json.loads(result_file.read_text())
    pre = record["preconditions"]
    models = {role: ROOT / path for role, path in record["models"].items()}
    for role, path in models.items():
        if f"{role}/ood" not in pre:
            pre[f"{role}/ood"] = greedy_accuracy(testbed, load_checkpoint(testbed, path), "ood", eval_samples)
    if testbed.base and "share_where_p_matters" not in pre:
        pre.update(subset_preconditions(testbed, models, eval_samples))
    for row in record["runs"]:
        if row["rc"] == 0:
            run_dir = out / f"seed{row['seed']}" / row["method"]
            subsets = {k.removeprefix("final_"): row[k] for k in ("final_where_p_matters", "final_elsewhere") if k in row}
            row.update(summarize_run(testbed, run_dir, eval_samples, final_ood=row.get("final_ood"),
                                     final_subsets=subsets if subsets or not testbed.base else None))
    save_record(result_file, record)


def plot_record(record: dict, path: Path) -> None:
    """Per-step HT / HS shares, entropy and KL to the teacher of every method: mean over seeds,
    the band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(dict.fromkeys(r["method"] for r in record["runs"]))
    palette = plt.get_cmap("tab20").colors
    colors = {m: palette[i % len(palette)] for i, m in enumerate(methods)}  # one colour per method in every panel
    fig, axes = plt.subplots(1, len(SERIES), figsize=(4.2 * len(SERIES), 3.6))
    for ax, key in zip(axes, SERIES):
        for method in methods:
            runs = [r["series"][key] for r in record["runs"]
                    if r["method"] == method and r["rc"] == 0 and key in r.get("series", {})]
            if not runs:
                continue
            values = np.array([run[:min(map(len, runs))] for run in runs])
            steps = np.arange(1, values.shape[1] + 1)
            ax.plot(steps, values.mean(0), label=method, lw=1.2, color=colors[method])
            ax.fill_between(steps, values.min(0), values.max(0), color=colors[method], alpha=0.15, lw=0)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key == "kl_to_teacher":
            ax.set_yscale("log")
    handles = [plt.Line2D([], [], color=colors[m], label=m) for m in methods]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(methods), 6), fontsize=7, frameon=False)
    fig.suptitle(f"{TESTBEDS[record.get('testbed', 'arithmetic')].title}, setting {record['setting']} (seeds {record['seeds']}): mean, band = "
                 "lowest to highest seed", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_markdown(testbed: Testbed, path: Path) -> None:
    """Rewrite (or append) only this testbed's section, from every stored setting."""
    body = []
    for file in setting_files(testbed):
        record = json.loads(file.read_text())
        commands = " then ".join(f"`{c}`" for c in record.get("commands", [record["command"]]))
        agg = aggregate(record["runs"], record["preconditions"])
        subsets = format_subset_table(agg, record["preconditions"])
        body += [f"### Setting `{record['setting']}`", "",
                 f"{commands} ({record.get('minutes', '?')} min of runs on {record['machine']}); seeds "
                 f"{', '.join(map(str, record['seeds']))}, {record['steps']} steps per run. Preconditions: "
                 f"{format_preconditions(record['preconditions'], testbed.ood)}.", "",
                 format_table(agg), "", *([subsets, ""] if subsets else []),
                 f"![per-step diagnostics, setting {record['setting']}](benchmarks/results/{file.with_suffix('.png').name})", ""]
    if findings_file(testbed).is_file():
        body += [findings_file(testbed).read_text().strip(), ""]
    write_section(path, testbed.section, body)


if __name__ == "__main__":
    sys.exit(main())
