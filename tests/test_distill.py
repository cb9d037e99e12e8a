"""jisu distill: the trainable model against transformers and the engine, the loss going down, resume, the
teacher cache, the evaluation table and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import make_tiny_hf_model

from jisu.cli import main as jisu_main
from jisu.distill.cli import removed_teacher_layers
from jisu.distill.config import DistillConfig
from jisu.distill.data import BUILTIN_TEXT, training_text
from jisu.distill.evaluate import evaluation_table
from jisu.distill.model import TrainableLM
from jisu.distill.teacher_cache import TeacherCache
from jisu.distill.trainer import distill, kl_loss, layer_map, lr_at, sparse_kl_loss
from jisu.errors import InvalidRequestError, UnsupportedModelError
from jisu.loader.resolve import load_checkpoint
from jisu.prune import prune
from jisu.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    # A random tiny model predicts nearly uniform distributions, which pruning barely moves; a sharper output
    # layer gives the student something to learn.
    from dataclasses import replace

    from jisu.loader.save import save_checkpoint

    ckpt = load_checkpoint(make_tiny_hf_model(tmp_path_factory.mktemp("random"), arch="llama", num_kv_heads=2))
    tensors = {**ckpt.tensors, "lm_head.weight": ckpt.tensors["lm_head.weight"] * 30}
    return save_checkpoint(tmp_path_factory.mktemp("teacher"), replace(ckpt, tensors=tensors))


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_checkpoint(teacher_dir)


@pytest.fixture(scope="module")
def student(teacher):
    return prune(teacher, "ffn", 0.5, score="weight")


def _data(ckpt, seq_len=32, holdout=0):
    return training_text(Tokenizer(ckpt.tokenizer), None, seq_len, holdout)


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", False)])
def test_logits_match_transformers(tmp_path, arch, tie):
    transformers = pytest.importorskip("transformers")
    folder = make_tiny_hf_model(tmp_path / arch, arch=arch, num_kv_heads=2, tie=tie)
    ckpt = load_checkpoint(folder)
    ids = torch.randint(0, ckpt.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(ids).logits
        got = TrainableLM(ckpt.config, ckpt.tensors)(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_qwen3_qk_norm_matches_transformers_and_gemma_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from arch_harness import save_tiny_hf, tiny_gemma3, tiny_vocab

    vocab, bos, eos = tiny_vocab()
    c = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, bos_token_id=bos, eos_token_id=eos,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    c.architectures = ["Qwen3ForCausalLM"]
    folder = save_tiny_hf(transformers.Qwen3ForCausalLM, c, tmp_path / "qwen3")
    ckpt = load_checkpoint(folder)
    ids = torch.randint(0, vocab, (1, 30), generator=torch.Generator().manual_seed(0))
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(TrainableLM(ckpt.config, ckpt.tensors)(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)
    cls, gc = tiny_gemma3()
    gemma = load_checkpoint(save_tiny_hf(cls, gc, tmp_path / "gemma3"))
    with pytest.raises(UnsupportedModelError, match="Gemma3ForCausalLM"):
        TrainableLM(gemma.config, gemma.tensors, "student")


@pytest.mark.real_model
def test_logits_match_the_engine_on_the_default_model(real_model_path):
    from jisu import LLM
    from jisu.eval.scoring import score_batch

    ckpt = load_checkpoint(real_model_path)
    ids = Tokenizer(ckpt.tokenizer).encode("The tower is 324 metres tall, about the same height as", False)
    llm = LLM(checkpoint=ckpt, weights="float32", max_model_len=128, max_num_seqs=1)
    (engine,) = score_batch(llm.engine, [ids])
    with torch.no_grad():
        mine = TrainableLM(ckpt.config, ckpt.tensors)(torch.tensor([ids]))[0]
    torch.testing.assert_close(mine[: len(engine)], engine.float(), rtol=2e-3, atol=2e-3)
    assert (mine[: len(engine)].argmax(-1) == engine.argmax(-1)).all()


def test_source_tensors_are_left_alone(student):
    before = {n: t.clone() for n, t in student.tensors.items()}
    model = TrainableLM(student.config, student.tensors)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[n], t) for n, t in student.tensors.items())


def test_distillation_lowers_the_kl_on_held_out_text(teacher, student):
    data = _data(student, 32, holdout=256)
    ids = torch.tensor([Tokenizer(teacher.tokenizer).encode(BUILTIN_TEXT.read_text(), False)[:256]])
    t, s = TrainableLM(teacher.config, teacher.tensors), TrainableLM(student.config, student.tensors)
    with torch.no_grad():
        held_before = kl_loss(s(ids), t(ids), 1.0).item()
    cfg = DistillConfig(steps=30, batch_size=4, seq_len=32, lr=1e-4, warmup_steps=2)
    report = distill(s, t, data, cfg)
    with torch.no_grad():
        held_after = kl_loss(s(ids), t(ids), 1.0).item()
    assert report.steps == 30 and report.tokens == 30 * 4 * 32 and len(report.losses) == 30
    assert held_after < 0.75 * held_before, (held_before, held_after)
    # Only the layers were trained (the default): the embedding is the one it started with.
    assert torch.equal(s.model.embed_tokens.weight, student.tensors["model.embed_tokens.weight"].float())


def test_resume_continues_bit_for_bit(teacher, student, tmp_path):
    data = _data(student)
    cfg = DistillConfig(steps=6, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=2, checkpoint_every=3)
    straight = TrainableLM(student.config, student.tensors)
    distill(straight, TrainableLM(teacher.config, teacher.tensors), data, cfg)

    # Stopped after step 3 (as by Ctrl-C): the state was saved before the step was reported.
    with pytest.raises(_Interrupt):
        distill(TrainableLM(student.config, student.tensors), TrainableLM(teacher.config, teacher.tensors), data,
                cfg, state_dir=tmp_path, on_progress=_stop_after(3))
    resumed = TrainableLM(student.config, student.tensors)
    report = distill(resumed, TrainableLM(teacher.config, teacher.tensors), data, cfg, state_dir=tmp_path,
                     resume=True)
    assert report.resumed_from_step == 3 and report.steps == 6
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(InvalidRequestError, match="differs in config"):
        distill(resumed, TrainableLM(teacher.config, teacher.tensors), data,
                DistillConfig(**{**vars(cfg), "lr": 5e-4}), state_dir=tmp_path, resume=True)
    with pytest.raises(InvalidRequestError, match="no distillation state"):
        distill(resumed, TrainableLM(teacher.config, teacher.tensors), data, cfg, state_dir=tmp_path / "none",
                resume=True)


class _Interrupt(Exception):
    pass


def _stop_after(n):
    def on_progress(p):
        if p.step == n:
            raise _Interrupt
    return on_progress


def test_teacher_cache_is_filled_once_and_matches_the_full_kl(teacher, student, tmp_path):
    data = _data(student)
    vocab = teacher.config.vocab_size
    t = TrainableLM(teacher.config, teacher.tensors)
    cache = TeacherCache(tmp_path, {"t": 1}, len(data.sequences), 32, vocab, 1.0)
    ids = torch.tensor([data.sequences[0], data.sequences[1]])
    top_ids, top_logp = cache.get([0, 1], ids, t, "cpu")
    assert cache.misses == 2 and cache.hits == 0
    again = TeacherCache(tmp_path, {"t": 1}, len(data.sequences), 32, vocab, 1.0)
    ids2, logp2 = again.get([1, 0], ids[[1, 0]], None, "cpu")  # no teacher: it must not be needed
    assert again.hits == 2 and torch.equal(ids2, top_ids[[1, 0]])
    # With every token kept, the cached loss is the full KL (float16 storage aside).
    s_logits = TrainableLM(student.config, student.tensors)(ids)
    with torch.no_grad():
        full = kl_loss(s_logits, t(ids), 1.0)
    torch.testing.assert_close(sparse_kl_loss(s_logits, top_ids, top_logp, 1.0), full, rtol=2e-2, atol=2e-3)
    with pytest.raises(InvalidRequestError, match="--teacher-top-k"):
        TeacherCache(tmp_path, {}, 1, 8, 0, 1.0)


def test_schedule_warms_up_then_decays_by_steps_or_by_time():
    cfg = DistillConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 0) == pytest.approx(1e-4) and lr_at(cfg, 9, 0) == pytest.approx(1e-3)
    assert lr_at(cfg, 10, 0) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + __import__("math").cos(0.1 * 3.14159265))),
                                              rel=1e-4)
    assert lr_at(cfg, 100, 0) == pytest.approx(1e-4)
    timed = DistillConfig(steps=10_000, lr=1e-3, warmup_steps=0, minutes=1.0)
    assert lr_at(timed, 5, 30.0) == pytest.approx(1e-3 * 0.55)  # half the time gone: halfway down the cosine
    assert lr_at(timed, 5, 90.0) == pytest.approx(1e-4)


def test_layer_map_follows_the_pruning_record():
    assert layer_map(4, 4, None) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert layer_map(5, 3, [1, 3]) == [(0, 0), (1, 2), (2, 4)]
    assert layer_map(5, 3, None) == [(2, 4)]
    # Two layer-pruning steps, each numbering the layers of the model it pruned.
    steps = [{"method": "layers", "removed": [1]}, {"method": "ffn"}, {"method": "layers", "removed": [2]}]
    assert removed_teacher_layers(steps, 5) == [1, 3]
    assert removed_teacher_layers([{"method": "layers", "removed": [9]}], 5) is None


@pytest.mark.parametrize("change,message", [
    ({"steps": 0}, "--steps is 0"), ({"lr": 2.0}, "--lr is 2.0"), ({"train": "everything"}, "--train is"),
    ({"temperature": 0}, "--temperature"), ({"batch_size": 0}, "--batch-size"), ({"minutes": -1}, "--minutes"),
])
def test_bad_settings_are_named(change, message):
    with pytest.raises(InvalidRequestError, match=message):
        DistillConfig(**change).check()


def test_unsupported_models_and_vocabularies_are_refused(teacher, student, tmp_path):
    from dataclasses import replace

    with pytest.raises(UnsupportedModelError, match="sandwich_norm"):
        TrainableLM(replace(student.config, sandwich_norm=True), student.tensors)
    other = replace(teacher.config, vocab_size=teacher.config.vocab_size + 1)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        distill(TrainableLM(student.config, student.tensors), _FakeTeacher(other), _data(student), DistillConfig())
    with pytest.raises(InvalidRequestError, match="--seq-len"):
        training_text(Tokenizer(student.tokenizer), None, 4)


class _FakeTeacher:
    def __init__(self, config):
        self.config = config


def test_evaluation_table_rows(teacher, student):
    text = BUILTIN_TEXT.read_text()[:20000]
    rows = evaluation_table(teacher, [("pruned", student)], text, ctx=64, chunks=2, decode_tokens=8, decode_runs=1)
    assert [r.label for r in rows] == ["teacher", "pruned"]
    t, p = rows
    assert t.kl_mean == 0 and t.top1_agreement == 1 and p.kl_mean > 0 and p.parameters < t.parameters
    assert all(r.ppl > 1 and r.decode_tokens_per_s > 0 for r in rows)


def test_cli_end_to_end(teacher_dir, tmp_path, capsys):
    pruned, out = tmp_path / "pruned", tmp_path / "distilled"
    assert jisu_main(["prune", str(teacher_dir), "--method", "layers", "--amount", "1", "--out", str(pruned),
                      "--calibration", str(BUILTIN_TEXT), "--calibration-new-tokens", "0"]) == 0
    capsys.readouterr()
    argv = ["distill", str(pruned), "--out", str(out), "--steps", "3", "--seq-len", "32", "--eval-chunks", "2",
            "--eval-ctx", "64", "--quantize", "int8", "--hidden-weight", "0.5", "--json"]
    assert jisu_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in report["evaluation"]] == ["teacher", "student before", "student after"]
    assert report["training"]["steps"] == 3 and not (out / "distill-state.pt").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["distillation"])["teacher"] == str(teacher_dir)  # found from the pruning record
    assert json.loads(meta["pruning"])[-1]["method"] == "layers"
    from jisu import LLM
    from jisu.sampling_params import SamplingParams

    for folder in (out, tmp_path / "distilled-int8"):
        llm = LLM(model=str(folder), max_model_len=64, max_num_seqs=1)
        assert llm.generate(["the quick"], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids

    # Refusals are one line each.
    assert jisu_main(argv) == 1
    assert "already holds a model" in capsys.readouterr().err
    assert jisu_main(["distill", str(teacher_dir), "--out", str(tmp_path / "x"), "--steps", "1"]) == 1
    assert "--teacher is needed" in capsys.readouterr().err
    assert jisu_main(["distill", str(pruned), "--out", str(tmp_path / "y"), "--resume"]) == 1
    assert "no distillation state" in capsys.readouterr().err


def test_prune_then_distill_in_one_command(teacher_dir, tmp_path, capsys):
    out = tmp_path / "pd"
    rc = jisu_main(["prune", str(teacher_dir), "--method", "ffn", "--amount", "0.5", "--score", "weight",
                    "--out", str(out), "--distill", "2", "--json"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["method"] == "ffn" and lines[-1]["training"]["steps"] == 2
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "distillation" in f.metadata()
