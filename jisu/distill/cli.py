"""`jisu distill STUDENT --teacher MODEL --out DIR`: train a pruned (or otherwise smaller) model to match the
model it came from, save it where every jisu command loads it, and print one evaluation table.

The student is trained on --text (default: jisu's built-in sampled text), evaluated on --eval-text (default:
the first --eval-chunks x --eval-ctx tokens of the training text, which are then never trained on), against the
teacher, before and after. Progress goes to stderr; --json prints the report as one JSON object on stdout.
`jisu prune ... --distill STEPS` runs the same training on the model it has just pruned (jisu/cli.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jisu.distill.config import TRAINABLE, DistillConfig


def add_distill_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "distill", help="train a pruned/smaller model to match the original (knowledge distillation) and evaluate it",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("student", help="the model to train: a folder written by `jisu prune`, or any model jisu loads")
    p.add_argument("--teacher", default=None, help="the model to match (default: the model the student was pruned "
                   "from, as `jisu prune` recorded it)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="folder for the distilled float32 model")
    p.add_argument("--overwrite", action="store_true", help="replace a model (and a saved run) already in --out")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (distill-state.pt)")
    add_training_args(p)
    p.add_argument("--quantize", default=None, metavar="WEIGHTS", help="also write a quantized copy (int8, int4, "
                   "... as `jisu quantize --weights`) to --quantized-out")
    p.add_argument("--quantized-out", default=None, metavar="DIR", help="folder for --quantize (default: OUT-WEIGHTS)")
    p.add_argument("--keep-state", action="store_true", help="keep distill-state.pt (optimizer moments, ~3x the "
                   "trained weights) after a finished run")
    add_eval_args(p)
    p.add_argument("--json", action="store_true", help="print the report (training and evaluation) as JSON")
    return p


def add_training_args(p: argparse.ArgumentParser, steps_flag: str = "--steps") -> None:
    d = DistillConfig()
    p.add_argument(steps_flag, dest="steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--minutes", type=float, default=None, help="wall-time budget: stop and end the schedule then")
    p.add_argument("--text", default=None, metavar="FILE", help="training text (default: jisu's built-in sampled text)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per training sequence (default {d.seq_len})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate, AdamW (default {d.lr:g})")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help=f"linear warm-up (default "
                   f"{d.warmup_steps}); cosine decay to --min-lr-ratio x lr after it")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help=f"(default {d.min_lr_ratio:g})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default {d.weight_decay:g})")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"softmax temperature of the KL "
                   f"(default {d.temperature:g})")
    p.add_argument("--hidden-weight", type=float, default=d.hidden_weight, help="weight of a hidden-state matching "
                   "loss on layers whose place in the teacher is known (default 0: logits only)")
    p.add_argument("--train", default=d.train, help=f"what is trained, comma-separated: {', '.join(TRAINABLE)} "
                   f"(default {d.train}: every layer's weights and the final norm, not the embeddings)")
    p.add_argument("--teacher-cache", default=None, metavar="DIR", help="keep the teacher's top-k probabilities "
                   "here and reuse them (later epochs, other students of the same teacher and text)")
    p.add_argument("--teacher-top-k", type=int, default=64, help="tokens kept per position with --teacher-cache")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="save the resumable state every "
                   f"N steps (default {d.checkpoint_every})")
    p.add_argument("--seed", type=int, default=d.seed, help="data order (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-text", default=None, metavar="FILE", help="held-out text for the table (default: the "
                   "start of the training text, then left out of training)")
    p.add_argument("--eval-chunks", type=int, default=20, help="chunks of --eval-ctx tokens scored (default 20)")
    p.add_argument("--eval-ctx", type=int, default=None, help="tokens per evaluation chunk (default 512, or the "
                   "models' context window when shorter)")
    p.add_argument("--eval-weights", default="float32", help="weight format every row runs in (default float32)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation table")


def run_distill(args) -> int:
    """Runs `jisu distill`; jisu.cli.main reports JisuError and OSError as one line, as for every command."""
    try:
        return _run(args)
    except FloatingPointError as e:  # a diverged loss: the message says what to change
        print(f"jisu: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jisu: interrupted; `--resume` continues from the last saved state", file=sys.stderr)
        return 130


def recorded_pruning(path: Path) -> tuple[str | None, list]:
    """(the model a `jisu prune` folder was pruned from, its pruning steps); (None, []) for anything else."""
    weights = path / "model.safetensors" if path.is_dir() else None
    if weights is None or not weights.is_file():
        return None, []
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        steps = json.loads(meta.get("pruning", "[]"))
    except Exception:  # an unreadable header is reported by the loader; the record is optional
        return None, []
    source = meta.get("pruning_source") or None
    return source, steps if isinstance(steps, list) else []


def removed_teacher_layers(steps: list, teacher_layers: int) -> list[int] | None:
    """The teacher's layer indices that the recorded layer-pruning steps removed (each step numbers the layers of
    the model it was applied to); None when the record does not say."""
    alive = list(range(teacher_layers))
    for s in steps:
        if not isinstance(s, dict) or s.get("method") != "layers":
            continue
        removed = s.get("removed")
        if not isinstance(removed, list) or not all(isinstance(i, int) and 0 <= i < len(alive) for i in removed):
            return None
        alive = [n for i, n in enumerate(alive) if i not in set(removed)]
    return [n for n in range(teacher_layers) if n not in alive]


def _config(args) -> DistillConfig:
    cfg = DistillConfig(steps=args.steps, minutes=args.minutes, seq_len=args.seq_len, batch_size=args.batch_size,
                        lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps,
                        weight_decay=args.weight_decay, temperature=args.temperature,
                        hidden_weight=args.hidden_weight, train=args.train, seed=args.seed,
                        checkpoint_every=args.checkpoint_every, device=args.device)
    cfg.check()
    return cfg


def _run(args) -> int:
    import torch

    from jisu.distill.data import training_text
    from jisu.distill.model import TrainableLM, check_trainable
    from jisu.distill.teacher_cache import TeacherCache
    from jisu.distill.config import STATE_FILE
    from jisu.distill.trainer import distill
    from jisu.errors import InvalidRequestError
    from jisu.eval.perplexity import check_ctx, read_text
    from jisu.loader.checkpoint import Checkpoint
    from jisu.loader.resolve import load_checkpoint, resolve_model
    from jisu.loader.save import check_output_folder, save_checkpoint
    from jisu.tokenizer import Tokenizer

    cfg = _config(args)
    say = (lambda msg: print(msg, file=sys.stderr))
    out = Path(args.out)
    state = out / STATE_FILE
    if args.resume and args.overwrite:
        raise InvalidRequestError("--resume continues the saved run and --overwrite starts over; give one")
    if not args.resume:
        check_output_folder(out, overwrite=args.overwrite)
        if state.exists() and not args.overwrite:
            raise InvalidRequestError(f"{out} holds a saved distillation run ({STATE_FILE}); --resume continues it, "
                                      "--overwrite starts over")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError(f"--device {args.device}: no CUDA device is available")
    if not args.no_eval:
        if args.eval_ctx is not None:
            check_ctx(args.eval_ctx)
        if isinstance(args.eval_chunks, bool) or args.eval_chunks < 1:
            raise InvalidRequestError(f"--eval-chunks must be an integer >= 1, got {args.eval_chunks}")
        from jisu.eval import check_weights

        check_weights(args.eval_weights)

    student_path = resolve_model(args.student)
    recorded_source, steps = recorded_pruning(student_path)
    teacher_name = args.teacher or recorded_source
    if teacher_name is None:
        raise InvalidRequestError(f"--teacher is needed: {student_path} does not record the model it was pruned from")
    teacher_path = resolve_model(teacher_name)
    say(f"student: {student_path}\nteacher: {teacher_path}")
    student_ckpt = load_checkpoint(student_path)
    teacher_ckpt = load_checkpoint(teacher_path)
    check_trainable(student_ckpt.config, "student")
    check_trainable(teacher_ckpt.config, "teacher")
    tok = Tokenizer(student_ckpt.tokenizer)
    probe = "Distillation needs one tokenizer: 123 + déjà vu"
    if tok.encode(probe, add_special_tokens=False) != Tokenizer(teacher_ckpt.tokenizer).encode(probe,
                                                                                                add_special_tokens=False):
        raise InvalidRequestError("the student and the teacher tokenize text differently; distillation needs the "
                                  "same tokenizer")

    window = min(student_ckpt.config.max_position_embeddings, teacher_ckpt.config.max_position_embeddings)
    if args.eval_ctx is None:
        args.eval_ctx = min(512, window)
    elif not args.no_eval and args.eval_ctx > window:
        raise InvalidRequestError(f"--eval-ctx {args.eval_ctx} exceeds the models' context window of {window} tokens")
    # Held-out text: the evaluation file's first chunks, left out of training when it is the training text too.
    eval_source = args.eval_text if args.eval_text is not None else args.text
    same_text = (None if eval_source is None else Path(eval_source).resolve()) == \
        (None if args.text is None else Path(args.text).resolve())
    holdout = args.eval_chunks * args.eval_ctx if (not args.no_eval and same_text) else 0
    data = training_text(tok, args.text, cfg.seq_len, holdout)
    say(f"training text: {data.source}: {len(data.sequences)} sequences of {cfg.seq_len} tokens"
        + (f" (its first {holdout} tokens held out for evaluation)" if holdout else ""))

    student = TrainableLM(student_ckpt.config, student_ckpt.tensors, "student")
    teacher = TrainableLM(teacher_ckpt.config, teacher_ckpt.tensors, "teacher")
    cache = None
    identity = {"student": str(student_path), "teacher": str(teacher_path)}
    if args.teacher_cache:
        cache = TeacherCache(args.teacher_cache, {"teacher": str(teacher_path), "data": data.fingerprint},
                             len(data.sequences), cfg.seq_len, args.teacher_top_k, cfg.temperature)
        identity["teacher_top_k"] = args.teacher_top_k
    removed = removed_teacher_layers(steps, teacher_ckpt.config.num_hidden_layers)
    progress = ProgressDisplay(cfg, say)
    report = distill(student, teacher, data, cfg, state_dir=out, resume=args.resume, removed_layers=removed,
                     teacher_cache=cache, fingerprint=identity, on_progress=progress)
    progress.close()
    del teacher
    say(f"trained {report.steps} steps ({report.tokens:,} tokens) in {report.elapsed_s / 60:.1f} min, "
        f"{report.tokens_per_s:.0f} tokens/s; loss {report.first_loss:.4f} -> {report.last_loss:.4f}")

    distilled = Checkpoint(config=student_ckpt.config, tensors=student.hf_tensors(),
                                       tokenizer=student_ckpt.tokenizer, source=str(out), metadata={})
    record = {"teacher": str(teacher_path), "student": str(student_path), "text": data.source,
              "config": {k: v for k, v in vars(cfg).items()}, **{k: v for k, v in report.to_dict().items()
                                                                 if k != "losses"}}
    metadata = {"distillation": json.dumps(record)}
    if recorded_source is not None:  # a pruned student's history travels with it
        metadata |= {"pruning_source": recorded_source, "pruning": json.dumps(steps)}
    save_checkpoint(out, distilled, metadata=metadata, overwrite=True)
    say(f"saved: {out}")
    if not args.keep_state:
        state.unlink(missing_ok=True)
    result = {"training": report.to_dict(), "out": str(out)}
    if args.quantize:
        result["quantized_out"] = str(_quantize(distilled, args, out, say))

    if not args.no_eval:
        from jisu.distill.evaluate import evaluation_table, format_table

        text = read_text(eval_source) if eval_source is not None else None
        if text is None:
            from jisu.distill.data import read_training_text

            text = read_training_text(None)[0]
        label = "built-in sampled text" if eval_source is None else str(eval_source)
        rows = evaluation_table(teacher_ckpt, [("student before", student_ckpt), ("student after", distilled)],
                                text, args.eval_ctx, args.eval_chunks, args.eval_weights, args.device, say=say)
        result["evaluation"] = [r.to_dict() for r in rows]
        table = format_table(rows, args.eval_chunks, args.eval_ctx, args.eval_weights, label)
        if not args.json:
            print(table)
    if args.json:
        print(json.dumps(result))
    return 0


def _quantize(checkpoint, args, out: Path, say) -> Path:
    from jisu.loader.save import save_hf_folder
    from jisu.quant.cli import quantized_tensors

    target = Path(args.quantized_out or f"{out}-{args.quantize}")
    spec, tensors, formats = quantized_tensors(checkpoint, args.quantize)
    record = {"weights": spec.label(), "method": "rtn", "source": str(out), "matrices": formats}
    save_hf_folder(target, checkpoint.config, tensors, checkpoint.tokenizer,
                   metadata={"format": "pt", "jisu.quantization": json.dumps(record)},
                   extra_config={"quantization_config": {"quant_method": "jisu", "weights": spec.label(),
                                                         "method": "rtn"}},
                   overwrite=args.overwrite or args.resume)
    say(f"saved {spec.label()}: {target}")
    return target


class ProgressDisplay:
    """A rich progress bar on stderr (step, loss, tokens/s, time left by steps or by the time budget); where
    stderr is not a terminal (a log file), one plain line every checkpoint_every steps instead."""

    def __init__(self, cfg: DistillConfig, say):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console = Console(stderr=True)
        self.every, self.say = cfg.checkpoint_every, say
        self.bar = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}  {task.fields[rate]} tok/s  {task.fields[left]} left"),
                            console=self.console) if self.console.is_terminal else None
        self.task = None

    def __call__(self, p) -> None:
        m, s = divmod(int(p.remaining_s), 60)
        fields = dict(loss=f"{p.loss:.4f}", rate=f"{p.tokens_per_s:.0f}", left=f"{m}:{s:02d}")
        if self.bar is None:
            if p.step % self.every == 0 or p.step == 1:
                self.say(f"step {p.step}/{p.steps}  loss {fields['loss']}  kl {p.kl:.4f}  lr {p.lr:.2e}  "
                         f"{fields['rate']} tok/s  {p.elapsed / 60:.1f} min  {fields['left']} left")
            return
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("distill", total=p.steps, **fields)
        self.bar.update(self.task, completed=p.step, **fields)

    def close(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.stop()
