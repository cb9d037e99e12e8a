"""Pruning: exact sparsity and patterns, structured pruning equal to zeroing what it removes, clear errors, CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from tiny_models import make_tiny_hf_model, write_gguf_from_hf

from jisu import LLM, SamplingParams
from jisu.loader.checkpoint import Checkpoint
from jisu.loader.resolve import load_checkpoint
from jisu.loader.save import save_checkpoint
from jisu.prune import (
    PruneError,
    collect_stats,
    count_nonzero,
    count_parameters,
    linear_weight_names,
    magnitude_prune,
    nm_prune,
    prune,
    prune_ffn,
    prune_heads,
    prune_layers,
)
from jisu.prune.cli import main as prune_main

PROMPT = [5, 17, 42, 99, 7, 250, 31, 64, 12, 8, 77, 150]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    llama = make_tiny_hf_model(root / "llama", arch="llama", num_kv_heads=2)
    return {
        "llama": load_checkpoint(llama),
        "llama-gguf": load_checkpoint(write_gguf_from_hf(llama, root / "llama.gguf")),  # q/k rows were permuted
        "qwen2": load_checkpoint(make_tiny_hf_model(root / "qwen2", arch="qwen2", num_kv_heads=2)),
        "tied-mha": load_checkpoint(make_tiny_hf_model(root / "tied", arch="llama", num_kv_heads=4, tie=True)),
        "dir": llama,
    }


@pytest.fixture(scope="module")
def stats(models):
    # One short calibration run per model, shared by the tests (prompt tokens plus 4 generated each).
    return {name: collect_stats(models[name], new_tokens=4) for name in ("llama", "llama-gguf", "qwen2")}


def logits(ckpt: Checkpoint, steps: int = 3) -> torch.Tensor:
    """The logits the engine samples from for PROMPT and `steps` - 1 greedy continuations."""
    llm = LLM(checkpoint=ckpt, max_model_len=64, max_num_seqs=1)
    runner, seen = llm.engine.runner, []
    original = runner.execute

    def spy(step):
        out = original(step)
        seen.append(out[0].clone())
        return out

    runner.execute = spy
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    return torch.stack(seen)


def with_tensors(ckpt: Checkpoint, **changes) -> Checkpoint:
    tensors = dict(ckpt.tensors)
    for name, fn in changes.items():
        tensors[name.replace("__", ".")] = fn(tensors[name.replace("__", ".")].clone())
    return Checkpoint(ckpt.config, tensors, ckpt.tokenizer, ckpt.source, dict(ckpt.metadata))


def zeroed(ckpt: Checkpoint, cols: dict[str, torch.Tensor]) -> Checkpoint:
    """ckpt with the given columns of the named matrices set to 0."""
    tensors = dict(ckpt.tensors)
    for name, idx in cols.items():
        t = tensors[name].clone()
        t[:, idx] = 0
        tensors[name] = t
    return Checkpoint(ckpt.config, tensors, ckpt.tokenizer, ckpt.source, dict(ckpt.metadata))


def assert_close(a: torch.Tensor, b: torch.Tensor):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= 1e-4 * b.abs().max().item(), f"max |diff| {err:.3g}"


def snapshot(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ckpt.tensors.items()}


def assert_unchanged(ckpt: Checkpoint, before: dict[str, torch.Tensor]):
    assert sorted(ckpt.tensors) == sorted(before)
    for k, v in before.items():
        assert torch.equal(ckpt.tensors[k], v), k


# ----------------------------------------------------------------------------- unstructured and N:M


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.73])
def test_unstructured_exact_sparsity_of_the_smallest(models, sparsity):
    ck = models["llama"]
    before = snapshot(ck)
    out = magnitude_prune(ck, sparsity)
    assert_unchanged(ck, before)
    names = linear_weight_names(ck)
    assert len(names) == 7 * ck.config.num_hidden_layers and "lm_head.weight" not in names
    for name, w in ck.tensors.items():
        p = out.tensors[name]
        if name not in names:
            assert torch.equal(p, w), name  # embeddings, norms, the output layer
            continue
        zeros = p == 0
        assert abs(int(zeros.sum()) - round(sparsity * w.numel())) <= 1, name
        assert torch.equal(p[~zeros], w[~zeros])  # kept weights unchanged
        assert w[zeros].abs().max() <= w[~zeros].abs().min(), name  # the zeroed ones are the smallest
    r = out.metadata["pruning"][-1]
    assert r["method"] == "unstructured" and r["amount"] == sparsity
    assert count_parameters(out) == count_parameters(ck) and count_nonzero(out) < count_nonzero(ck)


def test_unstructured_ties_still_give_the_exact_count(models):
    name = "model.layers.0.self_attn.q_proj.weight"
    ck = with_tensors(models["llama"], **{name.replace(".", "__"): lambda t: torch.full_like(t, 0.01)})
    w = magnitude_prune(ck, 0.3).tensors[name].reshape(-1)
    k = round(0.3 * w.numel())
    assert int((w == 0).sum()) == k and bool((w[:k] == 0).all())  # ties: the earlier positions go first


def test_activation_aware_unstructured_drops_the_least_important(models, stats):
    """score="activation": |w_ij| * sqrt(mean x_j^2) decides, still exactly per matrix; 2:4 likewise per group."""
    ck, st = models["llama"], stats["llama"]
    out = magnitude_prune(ck, 0.5, score="activation", stats=st)
    nm = nm_prune(ck, 2, 4, score="activation", stats=st)
    differs = False
    for name in linear_weight_names(ck):
        w, p = ck.tensors[name], out.tensors[name]
        importance = w.abs() * st.input_sq[name].sqrt()[None, :]
        zeros = p == 0
        assert abs(int(zeros.sum()) - round(0.5 * w.numel())) <= 1, name
        assert importance[zeros].max() <= importance[~zeros].min(), name
        differs |= not torch.equal(zeros, magnitude_prune(ck, 0.5).tensors[name] == 0)
        groups = importance.reshape(w.shape[0], -1, 4)
        kept = nm.tensors[name].reshape(groups.shape) != 0
        assert (kept.sum(-1) == 2).all()
        assert (groups.masked_fill(~kept, float("inf")).min(-1).values
                >= groups.masked_fill(kept, float("-inf")).max(-1).values).all(), name
    assert differs  # the inputs' scale changed the choice somewhere
    assert out.metadata["pruning"][-1]["calibration"]["tokens"] == st.tokens


def test_output_layer_only_on_request_and_never_when_tied(models):
    ck = models["llama"]
    assert torch.equal(magnitude_prune(ck, 0.5).tensors["lm_head.weight"], ck.tensors["lm_head.weight"])
    head = magnitude_prune(ck, 0.5, include_output=True).tensors["lm_head.weight"]
    assert int((head == 0).sum()) == round(0.5 * head.numel())
    tied = models["tied-mha"]
    out = magnitude_prune(tied, 0.5, include_output=True)
    assert "lm_head.weight" not in linear_weight_names(tied, include_output=True)
    assert torch.equal(out.tensors["model.embed_tokens.weight"], tied.tensors["model.embed_tokens.weight"])


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_holds_in_every_group(models, n, m):
    ck = models["qwen2"]
    before = snapshot(ck)
    out = prune(ck, f"{n}:{m}")
    assert_unchanged(ck, before)
    for name in linear_weight_names(ck):
        w, p = ck.tensors[name], out.tensors[name]
        groups_w = w.reshape(w.shape[0], -1, m).abs()
        groups_p = p.reshape(p.shape[0], -1, m)
        kept = groups_p != 0
        assert (kept.sum(-1) == n).all(), name  # random weights: no exact zeros among the kept
        # Every kept |w| is at least every dropped |w| of its group.
        lo = groups_w.masked_fill(~kept, float("inf")).min(-1).values
        hi = groups_w.masked_fill(kept, float("-inf")).max(-1).values
        assert (lo >= hi).all(), name
        assert torch.equal(groups_p[kept], w.reshape(groups_p.shape)[kept])
    for name in set(ck.tensors) - set(linear_weight_names(ck)):
        assert torch.equal(out.tensors[name], ck.tensors[name]), name  # biases and norms untouched


# ----------------------------------------------------------------------------- structured


@pytest.mark.parametrize("name", ["llama", "llama-gguf", "qwen2"])
def test_ffn_pruning_equals_zeroing_the_removed_channels(models, stats, name):
    ck = models[name]
    before = snapshot(ck)
    out = prune_ffn(ck, 0.25, stats=stats[name])
    assert_unchanged(ck, before)
    c = out.config
    assert c.intermediate_size == 96 and ck.config.intermediate_size == 128
    removed = out.metadata["pruning"][-1]["removed"]
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}.mlp."
        assert out.tensors[p + "gate_proj.weight"].shape == (96, 64)
        assert out.tensors[p + "up_proj.weight"].shape == (96, 64)
        assert out.tensors[p + "down_proj.weight"].shape == (64, 96)
        assert len(removed[n]) == 32
    reference = zeroed(ck, {f"model.layers.{n}.mlp.down_proj.weight": torch.tensor(removed[n])
                            for n in range(c.num_hidden_layers)})
    assert_close(logits(out), logits(reference))


@pytest.mark.parametrize("name", ["llama", "llama-gguf", "qwen2"])
def test_head_pruning_equals_zeroing_the_removed_heads(models, stats, name):
    ck = models[name]
    before = snapshot(ck)
    out = prune_heads(ck, num_kv_heads=1, stats=stats[name])
    assert_unchanged(ck, before)
    c, d = out.config, ck.config.head_dim
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, d)
    assert c.num_attention_heads * c.head_dim != c.hidden_size
    removed = out.metadata["pruning"][-1]["removed"]
    cols = {}
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}.self_attn."
        assert out.tensors[p + "q_proj.weight"].shape == (2 * d, 64)
        assert out.tensors[p + "k_proj.weight"].shape == (d, 64)
        assert out.tensors[p + "v_proj.weight"].shape == (d, 64)
        assert out.tensors[p + "o_proj.weight"].shape == (64, 2 * d)
        if c.attention_bias:
            assert out.tensors[p + "q_proj.bias"].shape == (2 * d,)
            assert out.tensors[p + "k_proj.bias"].shape == (d,)
        (g,) = removed[n]
        cols[p + "o_proj.weight"] = torch.arange(g * 2 * d, (g + 1) * 2 * d)  # its 2 query heads
    assert_close(logits(out), logits(zeroed(ck, cols)))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_layer_pruning_equals_skipping_the_layer(models, stats, name):
    ck = models[name]
    before = snapshot(ck)
    out = prune_layers(ck, 1, stats=stats[name])
    assert_unchanged(ck, before)
    (gone,) = out.metadata["pruning"][-1]["removed"]
    assert out.config.num_hidden_layers == 1
    layer_ids = {int(m.group(1)) for k in out.tensors if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    assert layer_ids == {0}
    kept = 1 - gone
    for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(out.tensors[f"model.layers.0.{suffix}"], ck.tensors[f"model.layers.{kept}.{suffix}"])
    # A layer whose o_proj and down_proj are zero passes the residual stream through unchanged.
    skip = zeroed(ck, {f"model.layers.{gone}.self_attn.o_proj.weight": torch.arange(64),
                       f"model.layers.{gone}.mlp.down_proj.weight": torch.arange(128)})
    assert_close(logits(out), logits(skip))


def test_scores_remove_what_does_nothing(models):
    """Plant a dead FFN channel, a dead kv group and an identity layer; the activation scores find them."""
    ck = models["llama"]
    dead_channels = torch.tensor([3, 77])

    def kill_channels(t):
        t[:, dead_channels] = 0
        return t

    def kill_group1(t):
        t[:, 2 * 16:] = 0  # query heads 2 and 3 read kv head 1
        return t

    planted = with_tensors(
        ck,
        model__layers__0__mlp__down_proj__weight=kill_channels,
        model__layers__1__self_attn__o_proj__weight=kill_group1,
    )
    st = collect_stats(planted, new_tokens=0)
    ffn = prune_ffn(planted, 2 / 128, stats=st)
    assert ffn.metadata["pruning"][-1]["removed"][0] == [3, 77]
    heads = prune_heads(planted, num_kv_heads=1, stats=st)
    assert heads.metadata["pruning"][-1]["removed"][1] == [1]
    identity = with_tensors(ck, model__layers__1__self_attn__o_proj__weight=torch.zeros_like,
                            model__layers__1__mlp__down_proj__weight=torch.zeros_like)
    st = collect_stats(identity, new_tokens=0)
    assert float(st.layer_angular[1]) < 1e-6
    assert prune_layers(identity, 1, stats=st).metadata["pruning"][-1]["removed"] == [1]


def test_weight_scores_need_no_calibration(models, monkeypatch):
    from jisu.prune import calibration

    def no_run(*a, **k):
        raise AssertionError("weight scores must not run calibration")

    monkeypatch.setattr(calibration, "collect_stats", no_run)
    ck = models["qwen2"]
    out = prune(ck, "ffn", 0.5, score="weight")
    assert out.config.intermediate_size == 64
    out = prune(out, "heads", 1, score="weight")
    assert out.config.num_key_value_heads == 1
    assert [r["method"] for r in out.metadata["pruning"]] == ["ffn", "heads"]
    assert logits(out, steps=1).isfinite().all()


def test_pruning_nothing_changes_nothing(models, stats):
    ck = models["llama"]
    ref = logits(ck)
    for method, amount in [("unstructured", 0.0), ("ffn", 0.0), ("heads", 0), ("layers", 0)]:
        out = prune(ck, method, amount, stats=stats["llama"])
        assert out.config == ck.config, method
        assert_unchanged(out, snapshot(ck))
        assert torch.equal(logits(out), ref), method
    assert torch.equal(logits(nm_prune(ck, 4, 4)), ref)


def test_pruned_model_saves_loads_and_generates(models, stats, tmp_path):
    ck = models["llama-gguf"]
    out = prune(prune(ck, "heads", 1, stats=stats["llama-gguf"]), "ffn", 0.25, score="weight")
    folder = save_checkpoint(tmp_path / "pruned", out)
    back = load_checkpoint(folder)
    assert back.config == out.config
    assert json.loads((folder / "config.json").read_text())["head_dim"] == 16
    for k, v in out.tensors.items():
        assert torch.equal(back.tensors[k], v), k
    llm = LLM(model=str(folder), max_model_len=64, max_num_seqs=1)
    text = llm.generate(["the quick brown fox"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert len(text.outputs[0].token_ids) == 8
    assert_close(logits(back), logits(out))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call,message", [
    (lambda ck: magnitude_prune(ck, 1.5), "sparsity must be in [0, 1), got 1.5"),
    (lambda ck: prune(ck, "unstructured", -0.1), "sparsity must be in [0, 1), got -0.1"),
    (lambda ck: prune(ck, "unstructured", "half"), "sparsity must be a number in [0, 1), got 'half'"),
    (lambda ck: prune(ck, "unstructured"), "unstructured pruning needs an amount"),
    (lambda ck: prune(ck, "magnitude", 0.5), "unknown pruning method 'magnitude'; choose one of: unstructured, 2:4"),
    (lambda ck: prune(ck, "2:4", 0.5), "2:4 pruning takes no amount"),
    (lambda ck: prune(ck, "5:4"), "must keep 1 <= N <= M"),
    (lambda ck: prune(ck, "2:x"), "an N:M pattern is two whole numbers"),
    (lambda ck: prune(ck, "3:5"), "3:5 pruning needs the input size of every matrix divisible by 5; model.layers.0."),
    (lambda ck: prune(ck, "ffn", 1.0), "the ffn fraction must be in [0, 1), got 1.0"),
    (lambda ck: prune(ck, "ffn", 0.999, score="weight"), "cannot remove 128 of the model's 128 FFN channels"),
    (lambda ck: prune(ck, "ffn", 0.5, score="fisher"), "unknown importance score 'fisher'"),
    (lambda ck: prune(ck, "unstructured", 0.5, score="fisher"), "unknown importance score 'fisher'"),
    (lambda ck: prune(ck, "heads", 2, score="weight"), "cannot remove 2 of the model's 2 kv head groups"),
    (lambda ck: prune(ck, "heads", 1.5), "a whole count of kv head groups, got 1.5"),
    (lambda ck: prune(ck, "heads", 0.25), "removing 1 of 4 attention heads (0.25) breaks GQA grouping"),
    (lambda ck: prune_heads(ck, num_heads=1), "removing 1 of 4 attention heads breaks GQA grouping"),
    (lambda ck: prune_heads(ck), "give exactly one of num_kv_heads"),
    (lambda ck: prune(ck, "layers", 2), "cannot remove 2 of the model's 2 layers; at least one must remain"),
    (lambda ck: prune(ck, "layers", -1), "num_layers must be a whole number >= 0, got -1"),
    (lambda ck: prune(ck, "layers", 1, score="weight"), "layer pruning always scores layers on calibration"),
])
def test_bad_input_gives_a_clear_error(models, call, message):
    with pytest.raises(PruneError) as e:
        call(models["llama"])
    assert message in str(e.value)


def test_quantized_tensors_are_refused(models):
    ck = models["llama"]
    name = "model.layers.0.mlp.down_proj.weight"
    q = with_tensors(ck, **{name.replace(".", "__"): lambda t: t.to(torch.int8)})
    with pytest.raises(PruneError, match="not a float matrix"):
        magnitude_prune(q, 0.5)
    qweight = {"model.layers.0.mlp.up_proj.qweight": torch.zeros(4, dtype=torch.uint8)}
    extra = Checkpoint(ck.config, {**ck.tensors, **qweight}, ck.tokenizer, ck.source)
    with pytest.raises(PruneError, match="up_proj.qweight, which pruning cannot resize"):
        prune(extra, "ffn", 0.5, score="weight")


# ----------------------------------------------------------------------------- CLI


def test_cli_end_to_end(models, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "out"
    rc = prune_main([str(models["dir"]), "--method", "layers", "--amount", "1", "--out", str(out),
                     "--calibration", str(text), "--calibration-new-tokens", "0"])
    shown = capsys.readouterr().out
    assert rc == 0, shown
    assert re.search(r"removed layers [01] of 2: 2 -> 1 layers \(importance: 1 - cos\(in, out\), \d+ calibration "
                     r"tokens from .*calib\.txt\)", shown)
    assert re.search(r"parameters: 135,616 -> 98,624 \(-27\.3%\)", shown)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["pruning_method"] == "layers" and meta["pruning_amount"] == "1"
    assert meta["pruning_source"] == str(models["dir"])
    assert json.loads(meta["pruning"])[-1]["removed"] in ([0], [1])
    assert load_checkpoint(out).config.num_hidden_layers == 1

    # Pruning the pruned folder again keeps the history in the header.
    again = tmp_path / "again"
    rc = prune_main([str(out), "--method", "ffn", "--amount", "0.5", "--score", "weight", "--out", str(again)])
    assert rc == 0 and "intermediate_size 128 -> 64" in capsys.readouterr().out
    with safe_open(str(again / "model.safetensors"), "pt") as f:
        assert [s["method"] for s in json.loads(f.metadata()["pruning"])] == ["layers", "ffn"]

    rc = prune_main([str(models["dir"]), "--method", "2:4", "--out", str(out), "--force", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["method"] == "2:4" and report["nonzero_after"] < report["nonzero_before"]
    assert load_checkpoint(out).config.num_hidden_layers == 2  # overwritten


@pytest.mark.parametrize("argv,message", [
    (["--method", "unstructured", "--amount", "1.5"], "jisu: error: sparsity must be in [0, 1), got 1.5"),
    (["--method", "prune-it", "--amount", "0.5"], "jisu: error: unknown pruning method 'prune-it'"),
    (["--method", "ffn"], "jisu: error: --method ffn needs --amount"),
    (["--method", "layers", "--amount", "5"], "jisu: error: cannot remove 5 of the model's 2 layers"),
    (["--method", "heads", "--amount", "0.25", "--score", "weight"], "breaks GQA grouping"),
])
def test_cli_errors_are_one_line(models, tmp_path, capsys, argv, message):
    rc = prune_main([str(models["dir"]), *argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert message in err and len(err.splitlines()) == 1


def test_cli_refuses_an_existing_model_folder(models, capsys):
    rc = prune_main([str(models["dir"]), "--method", "2:4", "--out", str(models["dir"])])
    err = capsys.readouterr().err
    assert rc == 1 and "already holds a model" in err and "--overwrite" in err
