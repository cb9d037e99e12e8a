"""Knowledge distillation: train a student (a pruned or otherwise smaller model with the same tokenizer) to
match a teacher's next-token distributions on calibration text.

Loss per token: T^2 * KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al.; T = temperature), plus,
when asked, the normalized squared error between student and teacher hidden states of matched layers. With a
teacher cache the teacher's top-k probabilities are computed once per text and reused (by later epochs and by
other students of the same teacher); the KL is then taken over those k tokens, renormalized.

AdamW with linear warm-up and cosine decay; the schedule runs over `steps`, or over `minutes` of wall time when
a time budget is given (whichever ends first). The run saves its state every `checkpoint_every` steps and can
resume from it bit for bit (same data order, optimizer moments and schedule).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from jisu.distill.config import STATE_FILE, DistillConfig
from jisu.distill.data import TrainingText
from jisu.distill.model import TrainableLM
from jisu.distill.teacher_cache import TeacherCache
from jisu.errors import InvalidRequestError

@dataclass
class Progress:
    step: int
    steps: int
    loss: float
    kl: float
    hidden: float
    lr: float
    tokens: int
    elapsed: float
    tokens_per_s: float
    remaining_s: float


@dataclass
class DistillReport:
    steps: int
    tokens: int
    elapsed_s: float
    tokens_per_s: float
    trained_parameters: int
    frozen_parameters: int
    first_loss: float
    last_loss: float
    losses: list[float] = field(default_factory=list)
    """Mean loss of every step."""
    resumed_from_step: int = 0
    teacher_cache: dict | None = None
    stopped_by: str = "steps"

    def to_dict(self) -> dict:
        return asdict(self)


def select_trainable(model: TrainableLM, train: str) -> tuple[int, int]:
    """Sets requires_grad on the parts `train` names; returns (trained, frozen) parameter counts."""
    parts = {p.strip() for p in train.split(",") if p.strip()}
    trained = frozen = 0
    for name, p in model.named_parameters():
        if name.startswith("model.embed_tokens") or name.startswith("lm_head"):
            want = bool(parts & {"all", "embeddings"})
        elif name == "model.norm.weight" or name.endswith("layernorm.weight") or name.endswith("_norm.weight"):
            want = bool(parts & {"layers", "all", "norms"})
        elif ".self_attn." in name:
            want = bool(parts & {"layers", "all", "attention"})
        elif ".mlp." in name:
            want = bool(parts & {"layers", "all", "mlp"})
        else:  # pragma: no cover - every parameter of TrainableLM is one of the above
            raise AssertionError(name)
        p.requires_grad_(want)
        if want:
            trained += p.numel()
        else:
            frozen += p.numel()
    if not trained:
        raise InvalidRequestError(f"--train {train} selects no parameters of this model")
    return trained, frozen


def lr_at(cfg: DistillConfig, step: int, elapsed: float) -> float:
    """Warm-up over the first steps, then cosine decay to lr * min_lr_ratio over the run's progress."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    done = step / cfg.steps
    if cfg.minutes is not None:
        done = max(done, elapsed / (cfg.minutes * 60))
    done = min(max(done, 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done)))


def layer_map(teacher_layers: int, student_layers: int, removed: list[int] | None) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs whose outputs play the same part: every layer when the counts match,
    the kept layers when `removed` says which teacher layers the student lacks, else only the last layers."""
    if teacher_layers == student_layers:
        return [(i, i) for i in range(student_layers)]
    if removed is not None and teacher_layers - len(set(removed)) == student_layers:
        kept = [i for i in range(teacher_layers) if i not in set(removed)]
        return list(enumerate(kept))
    return [(student_layers - 1, teacher_layers - 1)]


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over tokens of KL(teacher || student) at temperature T."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * (t * t)


def sparse_kl_loss(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """The KL over the teacher's cached top-k tokens (their probabilities renormalized to sum to 1)."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, top_ids.long())
    log_p = top_logp.float() - torch.logsumexp(top_logp.float(), dim=-1, keepdim=True)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * (t * t)


def hidden_loss(student_h: list[torch.Tensor], teacher_h: list[torch.Tensor], pairs) -> torch.Tensor:
    """Mean over matched layers of ||s - t||^2 / ||t||^2 (scale-free, so deep layers' large norms don't rule)."""
    terms = [(student_h[s] - teacher_h[t]).pow(2).mean() / teacher_h[t].pow(2).mean().clamp_min(1e-12)
             for s, t in pairs]
    return torch.stack(terms).mean()


def distill(
    student: TrainableLM,
    teacher: TrainableLM,
    data: TrainingText,
    cfg: DistillConfig,
    state_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    removed_layers: list[int] | None = None,
    teacher_cache: TeacherCache | None = None,
    fingerprint: dict | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> DistillReport:
    """Trains `student` in place. state_dir: where the resumable state is written every checkpoint_every steps
    (and read from, when resume). fingerprint: what the state must match to be resumed (sources, data)."""
    cfg.check()
    if teacher.config.vocab_size != student.config.vocab_size:
        raise InvalidRequestError(f"the student's vocabulary ({student.config.vocab_size} tokens) differs from the "
                                  f"teacher's ({teacher.config.vocab_size}); distillation needs the same tokenizer")
    if teacher_cache is not None and cfg.hidden_weight:
        raise InvalidRequestError("--hidden-weight needs the teacher's hidden states, which the teacher cache does "
                                  "not keep; use one or the other")
    device = torch.device(cfg.device)
    student.to(device).train()
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    trained, frozen = select_trainable(student, cfg.train)
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    pairs = layer_map(teacher.config.num_hidden_layers, student.config.num_hidden_layers, removed_layers)
    identity = {"config": _schedule_fields(cfg), "data": data.fingerprint, **(fingerprint or {})}

    step, elapsed_before, losses = 0, 0.0, []
    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    if resume:
        if state_path is None or not state_path.is_file():
            raise InvalidRequestError(f"--resume: no distillation state to resume in {state_dir}")
        state = torch.load(state_path, map_location=device, weights_only=False)
        differs = [k for k in identity if state["identity"].get(k) != identity[k]]
        if differs:
            raise InvalidRequestError(
                f"--resume: the saved run in {state_dir} differs in {', '.join(differs)}; resume with the same "
                "student, teacher, text and schedule, or start over with --overwrite")
        named = dict(student.named_parameters())
        with torch.no_grad():
            for name, value in state["params"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_before, losses = state["step"], state["elapsed"], state["losses"]
        torch.set_rng_state(state["rng"])
    resumed_from = step

    tokens_per_step = cfg.batch_size * cfg.seq_len
    start = time.perf_counter()
    stopped_by = "steps"
    last_saved = step
    while step < cfg.steps:
        elapsed = elapsed_before + time.perf_counter() - start
        if cfg.minutes is not None and elapsed >= cfg.minutes * 60:
            stopped_by = "minutes"
            break
        lr = lr_at(cfg, step, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_idx = _batch(order_for=lambda e: _epoch_order(len(data.sequences), cfg.seed, e),
                           step=step, batch_size=cfg.batch_size, n=len(data.sequences))
        ids = torch.tensor([data.sequences[i] for i in batch_idx], device=device)
        want_hidden = cfg.hidden_weight > 0
        if teacher_cache is not None:
            top_ids, top_logp = teacher_cache.get(batch_idx, ids, teacher, device)
            logits = student(ids)
            kl = sparse_kl_loss(logits, top_ids, top_logp, cfg.temperature)
            h = torch.zeros((), device=device)
        else:
            with torch.no_grad():
                t_out = teacher(ids, hidden_states=want_hidden)
            if want_hidden:
                logits, s_h = student(ids, hidden_states=True)
                t_logits, t_h = t_out
                h = hidden_loss(s_h, t_h, pairs)
            else:
                logits, t_logits, h = student(ids), t_out, torch.zeros((), device=device)
            kl = kl_loss(logits, t_logits, cfg.temperature)
        loss = kl + cfg.hidden_weight * h
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the distillation loss became {loss.item()} at step {step + 1}; lower --lr "
                                     f"(now {cfg.lr:g}) or raise --temperature")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        elapsed = elapsed_before + time.perf_counter() - start
        if state_path is not None and (step - last_saved >= cfg.checkpoint_every or step == cfg.steps):
            _save_state(state_path, student, optimizer, step, elapsed, losses, identity)
            last_saved = step
        if on_progress is not None:
            done_tokens = (step - resumed_from) * tokens_per_step
            rate = done_tokens / max(elapsed - elapsed_before, 1e-9)
            left = (cfg.steps - step) * tokens_per_step / rate
            if cfg.minutes is not None:
                left = min(left, max(cfg.minutes * 60 - elapsed, 0.0))
            on_progress(Progress(step, cfg.steps, loss.item(), kl.item(), h.item(), lr, step * tokens_per_step,
                                 elapsed, rate, left))
    elapsed = elapsed_before + time.perf_counter() - start
    if state_path is not None and step > last_saved:
        _save_state(state_path, student, optimizer, step, elapsed, losses, identity)
    student.eval()
    run_time = max(elapsed - elapsed_before, 1e-9)
    return DistillReport(
        steps=step, tokens=step * tokens_per_step, elapsed_s=elapsed,
        tokens_per_s=(step - resumed_from) * tokens_per_step / run_time,
        trained_parameters=trained, frozen_parameters=frozen,
        first_loss=losses[0] if losses else float("nan"), last_loss=losses[-1] if losses else float("nan"),
        losses=losses, resumed_from_step=resumed_from,
        teacher_cache=teacher_cache.describe() if teacher_cache is not None else None, stopped_by=stopped_by,
    )


def _schedule_fields(cfg: DistillConfig) -> dict:
    # What a resumed run must share with the saved one (the device may change).
    d = asdict(cfg)
    d.pop("device")
    d.pop("checkpoint_every")
    return d


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _batch(order_for, step: int, batch_size: int, n: int) -> list[int]:
    """The sequences of one step: consecutive slots of the epochs' shuffled orders (a step may span two)."""
    out = []
    for slot in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(slot, n)
        out.append(order_for(epoch)[pos])
    return out


def _save_state(path: Path, student, optimizer, step: int, elapsed: float, losses: list, identity: dict) -> None:
    # Written to a temporary file and renamed, so an interrupted save never leaves a torn state behind.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    params = {n: p.detach().cpu() for n, p in student.named_parameters() if p.requires_grad}
    torch.save({"params": params, "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed,
                "losses": losses, "rng": torch.get_rng_state(), "identity": identity}, tmp)
    os.replace(tmp, path)
