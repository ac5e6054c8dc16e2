"""Command line: ``dopd-vlm <command> ...`` (or ``python -m dopd_vlm <command> ...``).

Each command is a pair of functions: ``_add_<command>(subparsers)`` declares its arguments and
``run_<command>(args) -> int`` does the work. Imports live inside these functions rather than at
the top of this module, so one command's dependencies (DeepSpeed, datasets, ...) never load for
another. To add a command (train, eval, demo), write the pair and list ``_add_<command>`` in
``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from dopd_vlm import __version__

PROGRAM_DESCRIPTION = """\
dopd_vlm: Dual On-policy Distillation (DOPD) for vision-language models.

The student samples answers from the plain input (images + question). A frozen teacher and the
student itself, both shown privileged text the rollout did not see (e.g. labelled bounding
boxes), score every sampled token; a router decides per token which of the two to distil from and
with which divergence. Training runs on DeepSpeed (ZeRO-3 included), on GPUs or on a CPU.
Supported model families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and text-only Qwen3.
"""

PROGRAM_EPILOG = """\
Run 'dopd-vlm COMMAND --help' for the options of one command.

example:
  dopd-vlm make-tiny --family all --out checkpoints/tiny   # all four families, a few seconds
"""

MAKE_TINY_DESCRIPTION = """\
Build a tiny teacher and a smaller student of a real Qwen architecture, fully offline.

Weights are random (from a seed) and the configs are hand-written and small, so the models run
in milliseconds on a CPU: for tests, CI and demos, not for answers. Both models share one
byte-level BPE tokenizer (~500 tokens, Qwen special tokens and chat template) trained locally.
Vision families get their real processor; a 112x112 image becomes 16 image tokens.

Output layout: OUT/<family>/teacher and OUT/<family>/student, each loadable with
AutoModelForImageTextToText (or AutoModelForCausalLM for qwen3) and AutoProcessor, plus
OUT/<family>/tiny_spec.json. Re-running with the same options does nothing; different options
need --overwrite. The same seed always gives byte-identical files.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-wrapped descriptions as written; puts option help in one wide column."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)
        # argparse sizes the column without the sub-command indent, which pushes every
        # sub-command's help onto its own line; start from a width that fits them.
        self._action_max_length = 22


# --------------------------------------------------------------------------------------------
# make-tiny
# --------------------------------------------------------------------------------------------


def _add_make_tiny(subparsers) -> None:
    from dopd_vlm.families import FAMILIES
    from dopd_vlm.lab.tiny import STUDENT_SIZE, TEACHER_SIZE

    parser = subparsers.add_parser(
        "make-tiny",
        help="build tiny offline teacher/student checkpoints for tests and demos",
        description=MAKE_TINY_DESCRIPTION,
        epilog="example:\n  dopd-vlm make-tiny --family qwen2_vl --out /tmp/tiny --seed 0",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--family",
        choices=(*FAMILIES, "all"),
        default="all",
        help="model family to build, or 'all' (default: %(default)s)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (one sub-folder per family)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="weight seed (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if DIR holds a different tiny pair")

    sizes = parser.add_argument_group(
        "model sizes", "Overrides of the default sizes; the MLP width follows as 2x the hidden size."
    )
    for role, default in (("teacher", TEACHER_SIZE), ("student", STUDENT_SIZE)):
        sizes.add_argument(
            f"--{role}-hidden", type=int, metavar="N",
            help=f"{role} hidden size, divisible by its {default.num_heads} heads (default: {default.hidden_size})",
        )
        sizes.add_argument(
            f"--{role}-layers", type=int, metavar="N",
            help=f"{role} decoder layers (default: {default.num_layers})",
        )
        sizes.add_argument(
            f"--{role}-vocab-multiple", type=int, metavar="N",
            help=f"round the {role}'s vocab (LM-head rows) up to a multiple of N "
            f"(default: {default.vocab_multiple})",
        )
    parser.set_defaults(run=run_make_tiny)


def _size_from_args(args: argparse.Namespace, role: str, default):
    """The role's TinySize with the command-line overrides applied."""
    from dataclasses import replace

    changes = {}
    if (hidden := getattr(args, f"{role}_hidden")) is not None:
        changes.update(hidden_size=hidden, intermediate_size=2 * hidden)
    if (layers := getattr(args, f"{role}_layers")) is not None:
        changes["num_layers"] = layers
    if (multiple := getattr(args, f"{role}_vocab_multiple")) is not None:
        changes["vocab_multiple"] = multiple
    return replace(default, **changes)


def run_make_tiny(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dopd_vlm.families import FAMILIES
    from dopd_vlm.lab.tiny import STUDENT_SIZE, TEACHER_SIZE, make_tiny_pair

    try:
        teacher = _size_from_args(args, "teacher", TEACHER_SIZE)
        student = _size_from_args(args, "student", STUDENT_SIZE)
    except ValueError as err:
        print(f"dopd-vlm make-tiny: error: {err}", file=sys.stderr)
        return 2
    families = FAMILIES if args.family == "all" else (args.family,)
    for family in families:
        try:
            paths = make_tiny_pair(
                family, Path(args.out) / family, seed=args.seed,
                teacher=teacher, student=student, overwrite=args.overwrite,
            )
        except FileExistsError as err:
            print(f"dopd-vlm make-tiny: error: {err}", file=sys.stderr)
            return 1
        print(f"{family}: teacher={paths['teacher']} student={paths['student']}")
    return 0


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------

TRAIN_DESCRIPTION = """\
Post-train a student with DOPD (or a baseline method) on DeepSpeed.

CONFIG is a YAML file (see configs/ and the README's configuration reference); any key can be
overridden on the command line as dotted.key=value. The config is validated before any model
loads. One process runs as is; for several use a launcher:

  torchrun --nproc_per_node 2 -m dopd_vlm train --config configs/tiny_dopd.yaml
  deepspeed --num_gpus 8 --module dopd_vlm train --config configs/qwen3vl_8b_to_2b.yaml

The run owns train.output_dir while it runs (run.lock; a second launch there is refused). A folder
holding an earlier run (checkpoints, metrics, an export) is refused unless --resume continues it
or --overwrite deletes it and starts over. SIGTERM or SIGUSR1 (Slurm: --signal=USR1@120) finishes
the step under way, writes a checkpoint on every rank and exits 75; a second signal exits at once.

exit codes:
  0   finished
  1   the run stopped: non-finite training, a write that failed (disk full, read-only, quota),
      the vLLM engine failed; one line naming the file or cause and the checkpoint to resume from
  2   the input cannot be used: config, data, checkpoints, DeepSpeed JSON, an output folder that
      cannot be written, is in use by another run or holds an earlier one; one line, no traceback
  75  preempted (SIGTERM/SIGUSR1): the checkpoint is written; continue with --resume
"""


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="distil a teacher into a student (DOPD, vanilla OPD, OPSD, GKD, SFT)",
        description=TRAIN_DESCRIPTION,
        epilog="example:\n  dopd-vlm train --config configs/tiny_dopd.yaml method.name=vanilla_opd train.steps=20",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--config", required=True, metavar="YAML", help="run config")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in train.output_dir from its latest complete checkpoint "
                        "(from step 0 if it has none)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a train.output_dir holding an earlier run: delete its checkpoints, "
                        "metrics, TensorBoard logs, config copy and export (once set-up has succeeded)")
    parser.add_argument(
        "--stop-after-step", type=int, metavar="N",
        help="checkpoint and exit after step N (time-limited jobs); finish later with --resume",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=1e-5")
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Exit codes: 0 done; 2 an expected failure of the input (config, data, checkpoint, the
    output folder in use or holding an earlier run, ...: one line, every rank, `errors.InputError`);
    1 the run stopped (non-finite training, a write that failed, the vLLM engine);
    75 (`preemption.EXIT_PREEMPTED`) preempted, after the checkpoint. Anything else is a bug: its
    traceback is kept."""
    return one_line_input_errors("train", lambda: _train(args))


def one_line_input_errors(command: str, run: Callable[[], int]) -> int:
    """`run()`'s exit status; an `InputError` it raises is printed as one line and gives
    `EXIT_INPUT_ERROR`, on every rank: each rank waits for the others to print theirs before
    exiting, as a launcher kills the rest of the workers once one has exited."""
    from dopd_vlm.errors import EXIT_INPUT_ERROR, InputError

    try:
        return run()
    except InputError as err:
        return report_failure(command, err, EXIT_INPUT_ERROR)


def report_failure(command: str, err: Exception, code: int, label: str = "error") -> int:
    """Print `err` as the command's one `label` line, wait for the other ranks to print theirs
    (a launcher kills the rest of the workers once one has exited), return `code`."""
    from dopd_vlm.distributed import wait_for_peers_before_exit

    print(f"dopd-vlm {command}: {label}: {err}", file=sys.stderr, flush=True)
    wait_for_peers_before_exit()
    return code


def _train(args: argparse.Namespace) -> int:
    from dopd_vlm.config import ConfigError, load_config

    if args.stop_after_step is not None and args.stop_after_step < 1:
        raise ConfigError(f"--stop-after-step must be >= 1, got {args.stop_after_step}")
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the earlier run or start over")
    cfg = load_config(args.config, args.overrides)  # before the heavy imports: a bad config fails fast
    from dopd_vlm.engine import NonFiniteTraining
    from dopd_vlm.preemption import EXIT_PREEMPTED, Preempted
    from dopd_vlm.run_folder import RunWriteError
    from dopd_vlm.train import train
    from dopd_vlm.vllm_rollout import RolloutEngineError

    try:
        train(cfg, resume=args.resume, overwrite=args.overwrite, stop_after_step=args.stop_after_step)
    except Preempted as stop:
        return report_failure("train", stop, EXIT_PREEMPTED, label="preempted")
    except (NonFiniteTraining, RunWriteError, RolloutEngineError) as err:
        return report_failure("train", err, 1)
    return 0


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------

EVAL_DESCRIPTION = """\
Greedy accuracy of a saved model on recipe splits, exactly as training evaluation measures it.

--model is a checkpoint folder or hub id (a run's final/, the teacher, the initial student), or a
PEFT adapter folder (a LoRA run's final/) on the base it names; --adapter puts an adapter on
--model (or on the base it names). With --config the settings are the run's: data.* (recipe,
eval_splits, max_eval_samples, pixel bounds, chat_template_kwargs, privileged_template), the
length cap (train.eval_max_new_tokens, else rollout.max_new_tokens), one micro-batch of
sequences per generate call, model.dtype; flags and dotted overrides change them. Answers are
read with the recipe's answer_extractor, after a thinking model's last </think>; a response
whose think block never closes is wrong and counted (unclosed_think). Under torchrun the ranks
share the samples and rank 0 prints one result:

  torchrun --nproc_per_node 8 -m dopd_vlm eval --config run.yaml --model runs/x/final --json -
"""


def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="greedy accuracy of a checkpoint or adapter on recipe splits (a table and JSON)",
        description=EVAL_DESCRIPTION,
        epilog="examples:\n"
        "  dopd-vlm eval --config configs/tiny_dopd.yaml --model runs/tiny_dopd/final\n"
        "  dopd-vlm eval --model Qwen/Qwen3-VL-2B-Instruct --recipe my_recipe.yaml --split test --limit 500 \\\n"
        "      data.max_pixels=401408 \"data.chat_template_kwargs={enable_thinking: false}\" --json results.json",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--config", metavar="YAML", help="run config whose evaluation settings to use")
    parser.add_argument("--model", metavar="PATH", help="checkpoint or adapter folder, or hub id "
                        "(default: the config's model.student)")
    parser.add_argument("--adapter", metavar="PATH", help="PEFT adapter folder to put on the model")
    parser.add_argument("--recipe", metavar="R", help="recipe name or YAML (default: the config's data.recipe)")
    parser.add_argument("--split", action="append", metavar="S", dest="splits",
                        help="split to evaluate; repeat for several (default: the config's data.eval_splits)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="first N samples per split, 0 = all (default: the config's data.max_eval_samples)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="length cap of the answers "
                        "(default: train.eval_max_new_tokens, else rollout.max_new_tokens)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="sequences per generate call "
                        "(default: train.prompts_per_micro_batch x rollout.num_rollouts)")
    parser.add_argument("--privileged", action="store_true", help="score the privileged view (x + p)")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE ('-': stdout, "
                        "the table then goes to stderr)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    """Exit codes: 0 done; 2 an unusable input (one line, every rank), as `train`."""
    return one_line_input_errors("eval", lambda: _eval(args))


def _eval(args: argparse.Namespace) -> int:
    import json

    from dopd_vlm.config import load_config

    cfg = load_config(args.config, args.overrides, training=False)  # before the heavy imports
    json_target = _json_target(args.json)
    from dopd_vlm.checkpoint_eval import eval_request, evaluate_checkpoint
    from dopd_vlm.distributed import rank

    request = eval_request(cfg, model=args.model, adapter=args.adapter, recipe=args.recipe, splits=args.splits,
                           limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           privileged=args.privileged, config_path=args.config or "")
    report = evaluate_checkpoint(request)
    if rank() == 0:
        print(report.table(), file=sys.stderr if json_target == "-" else sys.stdout, flush=True)
        if json_target == "-":
            print(json.dumps(report.to_json(), indent=1), flush=True)
        elif json_target is not None:
            json_target.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return 0


def _json_target(value: str | None):
    """Where --json writes: None, "-" (stdout) or a file whose folder exists and can be written
    (checked now, not after the evaluation)."""
    import os
    from pathlib import Path

    from dopd_vlm.errors import InputError

    if value is None or value == "-":
        return value
    path = Path(value)
    folder = path.parent
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        reason = "is a folder" if path.is_dir() else "its folder does not exist" if not folder.is_dir() else \
            "its folder cannot be written"
        raise InputError(f"--json {value}: {reason}")
    return path


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------

DEMO_DESCRIPTION = """\
Distil a tiny warmed-up teacher into a tiny student on a built-in testbed, with DOPD and the
baselines, and report what each method achieved.

1. The testbed (--testbed): `arithmetic` (default; text, tiny Qwen3: mod-10 chains written in
   steps, p = the first step's value) or `cells` (vision, tiny Qwen2-VL: the operands are
   coloured cells in the image, p = their digits) use the warmed-up pair they ship in
   demo_assets/ (configs/testbed_<name>.yaml); `scenes` (synthetic scenes, tiny Qwen2-VL, p = the
   labelled boxes) loads its shipped teacher (or rebuilds it: --rebuild-teacher, ~30
   CPU-minutes, deterministic) and warms up a student briefly (cached in --cache).
2. Runs `dopd-vlm train --config <the testbed's config>` once per method, same student, seed,
   steps and batches, evaluating on the test and out-of-distribution splits.
3. Prints the table (accuracy, share of the teacher-student gap recovered, wall time) and
   writes OUT/results.md, OUT/results.json, OUT/accuracy.png and OUT/regimes.png.
"""


def _add_demo(subparsers) -> None:
    from dopd_vlm.lab.demo import DEFAULT_METHODS, DEMO_METHODS, DEMO_TESTBEDS, DemoOptions

    defaults = DemoOptions()
    parser = subparsers.add_parser(
        "demo",
        help="distil a tiny teacher into a student with DOPD and baselines; table and plots",
        description=DEMO_DESCRIPTION,
        epilog="examples:\n  dopd-vlm demo --steps 100 --methods dopd vanilla_opd --out runs/demo_short\n"
        "  dopd-vlm demo --methods dopd sft -- optim.lr=5e-4",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--out", default=str(defaults.out), metavar="DIR", help="output folder (default: %(default)s)")
    parser.add_argument("--testbed", choices=DEMO_TESTBEDS, default=defaults.testbed,
                        help="testbed to distil on (default: %(default)s)")
    parser.add_argument("--cache", default=str(defaults.cache), metavar="DIR",
                        help="cache of warmed-up checkpoints, --testbed scenes (default: %(default)s)")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="distillation steps per method (default: the testbed config's train.steps)")
    parser.add_argument("--seed", type=int, default=defaults.seed, metavar="N", help="trainer seed (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", choices=tuple(DEMO_METHODS), default=list(DEFAULT_METHODS), metavar="NAME",
                        help=f"methods to run, of {', '.join(DEMO_METHODS)} (default: all)")
    parser.add_argument("--jobs", type=int, default=0, metavar="N",
                        help="training runs side by side (default: one per CPU core, at most one per method)")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every, metavar="N",
                        help="evaluate every N steps (default: %(default)s)")
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples, metavar="N",
                        help="samples per eval split, 0 = all (default: %(default)s)")
    parser.add_argument("--rebuild-teacher", action="store_true",
                        help="--testbed scenes: rerun the teacher warm-up and rewrite demo_assets/ (~30 CPU-minutes)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides for every run, e.g. optim.lr=5e-4 (after -- when --methods is last)")
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dopd_vlm.lab.demo import DemoOptions

    if (args.steps is not None and args.steps < 1) or args.jobs < 0 or args.eval_every < 0 or args.eval_samples < 0:
        print("dopd-vlm demo: error: --steps must be >= 1; --jobs, --eval-every, --eval-samples >= 0", file=sys.stderr)
        return 2
    options = DemoOptions(
        out=Path(args.out), testbed=args.testbed, cache=Path(args.cache), steps=args.steps, seed=args.seed,
        methods=tuple(args.methods),
        jobs=args.jobs, eval_every=args.eval_every, eval_samples=args.eval_samples,
        rebuild_teacher=args.rebuild_teacher, overrides=tuple(args.overrides),
    )
    return one_line_input_errors("demo", lambda: _demo(options))


def _demo(options) -> int:
    from dopd_vlm.lab.demo import run_demo

    try:
        run_demo(options)
    except RuntimeError as err:  # a training run failed: its log's tail is in the message
        return report_failure("demo", err, 1)
    return 0


# --------------------------------------------------------------------------------------------
# Program
# --------------------------------------------------------------------------------------------

_COMMANDS = (_add_make_tiny, _add_train, _add_eval, _add_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dopd-vlm",
        description=PROGRAM_DESCRIPTION,
        epilog=PROGRAM_EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # the `deepspeed` launcher passes --local_rank=N before the command; LOCAL_RANK carries it too
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the chosen command, return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)


def entry_point() -> None:
    """The `dopd-vlm` console script: `main`, then an exit that is safe after a distributed run."""
    from dopd_vlm.distributed import exit_process

    try:
        code = main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_process(code)


if __name__ == "__main__":
    entry_point()
