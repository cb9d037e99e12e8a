"""`jisu profile --mermaid`: the pipeline diagram parses, its stage times add up to the step time, and its figures
are the profile's own.

The diagram is checked by a strict structural parser here (node ids, edges, subgraphs, quoted labels), and by
Mermaid's own parser when JISU_MERMAID_NODE_MODULES names a node_modules folder holding `mermaid` and `jsdom`
(npm install mermaid@11 jsdom): GitHub renders with the same library.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jisu.profile.mermaid import STEP_STAGES, _label, mermaid_diagram, pipeline_stages, write_mermaid
from jisu.profile.run import step_phase

ROOT = Path(__file__).resolve().parents[1]
STEP_NODES = ("embed", "attn", "ffn", "lm_out", "fwd_other", "sample", "detok", "bookkeep")

_ID = r"[A-Za-z_][A-Za-z0-9_]*"
_LABEL = r'"(?:[^"<>]|<br/>)*"'
NODE = re.compile(rf"^({_ID})\[({_LABEL})\]$")
SUBGRAPH = re.compile(rf"^subgraph ({_ID})\[({_LABEL})\]$")
EDGE = re.compile(rf'^({_ID}) (-->|-\.->|~~~)(?:\|("[^"<>|]*")\|)? ({_ID})$')
DIRECTION = re.compile(r"^direction (TB|TD|BT|LR|RL)$")
RESERVED = {"end", "subgraph", "graph", "flowchart", "style", "class", "classDef", "click", "linkStyle", "default"}


def check_structure(diagram: str) -> dict[str, str]:
    """Raises AssertionError unless `diagram` is a flowchart of quoted-label nodes and subgraphs, each id defined
    once, every edge between defined ids, subgraphs balanced. Returns label (unquoted) by id."""
    lines = [line.strip() for line in diagram.splitlines() if line.strip()]
    assert lines and lines[0] == "flowchart TD", f"first line must be 'flowchart TD', got {lines[:1]}"
    labels: dict[str, str] = {}
    edges: list[tuple[str, str]] = []
    depth = 0
    for line in lines[1:]:
        if line == "end":
            depth -= 1
            assert depth >= 0, "'end' without a subgraph"
        elif DIRECTION.match(line):
            assert depth > 0, "direction outside a subgraph"
        elif m := SUBGRAPH.match(line) or NODE.match(line):
            ident, label = m.groups()
            assert ident not in RESERVED, f"id {ident!r} is a Mermaid keyword"
            assert ident not in labels, f"id {ident!r} is defined twice"
            labels[ident] = label[1:-1]
            depth += line.startswith("subgraph ")
        elif m := EDGE.match(line):
            edges.append((m.group(1), m.group(4)))
        else:
            raise AssertionError(f"not a node, subgraph, edge or end: {line!r}")
    assert depth == 0, f"{depth} subgraph(s) not closed"
    for a, b in edges:
        assert a in labels and b in labels, f"edge {a} -> {b} refers to an undefined id"
    for ident, label in labels.items():
        # Entity codes are Mermaid's escapes: '#' starts one, so a bare '#' must be one too.
        assert re.fullmatch(r"(?:[^#]|#\w+;)*", label), f"{ident}: stray '#' in {label!r}"
    return labels


PHASE_TIME = re.compile(r"(prefill|decode|mixed): ([0-9.]+) ms/token, ([0-9.]+)%")


def annotated(labels: dict[str, str]) -> dict[str, dict[str, tuple[str, str]]]:
    """Per node, per phase: (ms/token, % of step) as printed."""
    return {ident: {ph: (ms, pct) for ph, ms, pct in PHASE_TIME.findall(label)} for ident, label in labels.items()}


def _half_ulp(printed: str) -> float:
    decimals = len(printed.partition(".")[2])
    return 0.5 * 10 ** -decimals


@pytest.fixture(scope="module")
def profiled(real_llm):
    from jisu.profile.calibrate import measure
    from jisu.profile.run import Workload, run_profile

    calibration = measure("cpu", quick=True)
    result = run_profile(real_llm, Workload(num_prompts=2, input_len=24, output_len=6), calibration)
    return result, calibration


@pytest.mark.real_model
def test_diagram_parses_and_names_every_stage(profiled):
    result, calibration = profiled
    diagram = mermaid_diagram(result, calibration)
    labels = check_structure(diagram)
    assert {"text_in", "tokenize", "step", "layers", "text_out", "step_time", *STEP_NODES} <= set(labels)
    assert labels["layers"].startswith(f"{len(result.layers)} × decoder layer")
    for node in STEP_NODES:
        assert set(annotated(labels)[node]) == {"prefill", "decode"}, node
    # The model's stages carry bytes, FLOPs and a roofline percentage; the others only time.
    for node in ("embed", "attn", "ffn", "lm_out"):
        assert "B/token" in labels[node] and "FLOP/token" in labels[node] and "of roofline bound" in labels[node]
    for node in ("sample", "detok", "bookkeep", "fwd_other"):
        assert "FLOP" not in labels[node]
    for phase in ("prefill", "decode"):
        pct = round(result.phases[phase]["roofline"]["percent_of_bound"])
        assert f"{pct}% of roofline bound" in labels["step_time"]

    uncalibrated = check_structure(mermaid_diagram(result, None))
    assert "n/a (run jisu calibrate)" in uncalibrated["attn"] and "% of roofline bound" not in uncalibrated["attn"]


@pytest.mark.real_model
def test_annotated_times_add_up_to_the_step_time(profiled):
    result, calibration = profiled
    labels = check_structure(mermaid_diagram(result, calibration))
    times = annotated(labels)
    for phase in ("prefill", "decode"):
        step_ms, step_pct = times["step_time"][phase]
        assert step_pct == "100"
        ph = result.phases[phase]
        assert float(step_ms) == pytest.approx(1e3 * ph["seconds"] / ph["tokens"], abs=_half_ulp(step_ms))
        printed = [times[node][phase] for node in STEP_NODES]
        total_ms = sum(float(ms) for ms, _ in printed)
        tolerance = _half_ulp(step_ms) + sum(_half_ulp(ms) for ms, _ in printed)
        assert total_ms == pytest.approx(float(step_ms), abs=tolerance), (phase, printed, step_ms)
        assert sum(float(p) for _, p in printed) == pytest.approx(100.0, abs=0.05 * len(printed) + 1e-9)

    # Unrounded: the stages partition the step time, and the model stages its FLOPs and compulsory bytes.
    data = pipeline_stages(result, calibration)
    for phase, info in data["phases"].items():
        steps = [(s, c) for s, c in zip(result.steps, result.step_costs) if step_phase(s) == phase]
        stages = {k: data["stages"][k][phase] for k in STEP_STAGES}
        assert sum(v["seconds"] for v in stages.values()) == pytest.approx(sum(s.total for s, _ in steps), rel=1e-9)
        assert all(v["seconds"] >= 0 for v in stages.values())
        modelled = [v for v in stages.values() if v["flops"] is not None]
        assert sum(v["flops"] for v in modelled) == pytest.approx(sum(c.flops.total for _, c in steps), rel=1e-9)
        assert sum(v["bytes"] for v in modelled) == pytest.approx(sum(c.bytes.compulsory for _, c in steps), rel=1e-9)
        # Measured, not assumed: every layer stage and the text stages took time.
        for k in ("attention", "ffn", "output_layer", "sampling", "detokenizer"):
            assert stages[k]["seconds"] > 0, (phase, k)
        assert info["sampled"] == sum(1 for s, _ in steps for *_, samples in s.batch if samples)
    assert data["tokenizer"]["seconds"] > 0 and data["tokenizer"]["tokens"] >= 2 * 24 - 2
    assert data["detokenizer"]["tokens"] == 2 * 6


@pytest.mark.real_model
def test_mermaid_own_parser_accepts_the_diagram(profiled, tmp_path):
    """Mermaid's parser (what GitHub renders with), when a node_modules folder with mermaid and jsdom is given."""
    modules = os.environ.get("JISU_MERMAID_NODE_MODULES")
    node = shutil.which("node")
    if not modules or node is None:
        pytest.skip("set JISU_MERMAID_NODE_MODULES to a node_modules with mermaid@11 and jsdom (and have node)")
    (tmp_path / "node_modules").symlink_to(Path(modules).resolve())
    script = tmp_path / "parse.mjs"
    script.write_text(
        'import { JSDOM } from "jsdom";\n'
        'const dom = new JSDOM("<!doctype html><html><body></body></html>");\n'
        "globalThis.window = dom.window; globalThis.document = dom.window.document;\n"
        'const { default: mermaid } = await import("mermaid");\n'
        "const chunks = []; for await (const c of process.stdin) chunks.push(c);\n"
        "const r = await mermaid.parse(Buffer.concat(chunks).toString());\n"
        "console.log(JSON.stringify({ type: r.diagramType }));\n"
    )

    def parse(text: str) -> subprocess.CompletedProcess:
        return subprocess.run([node, str(script)], input=text, capture_output=True, text=True, timeout=120)

    result, calibration = profiled
    for cal in (calibration, None):
        proc = parse(mermaid_diagram(result, cal))
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["type"].startswith("flowchart")
    assert parse("flowchart TD\n    a[\"unclosed --> b\n").returncode != 0  # the parser does reject bad input


def test_structure_check_rejects_broken_diagrams():
    good = 'flowchart TD\n    subgraph s["S"]\n        a["A<br/>x"]\n    end\n    b["B"]\n    a --> b\n'
    check_structure(good)
    broken = {
        "undefined edge target": good + "    a --> c\n",
        "unclosed subgraph": good.replace("    end\n", ""),
        "stray end": good + "end\n",
        "duplicate id": good + '    b["again"]\n',
        "raw quote in a label": good.replace('"A<br/>x"', '"A "x""'),
        "raw angle bracket": good.replace("x", "x > y"),
        "unquoted label": good.replace('["B"]', "[B]"),
        "stray #": good.replace("x", "#1"),
    }
    for why, text in broken.items():
        with pytest.raises(AssertionError):
            check_structure(text)
            pytest.fail(f"accepted a diagram with {why}")


def test_labels_escape_mermaid_syntax():
    label = _label('say "hi"', "a < b > c", "#1")
    assert label == '"say #quot;hi#quot;<br/>a #lt; b #gt; c<br/>#35;1"'
    check_structure(f"flowchart TD\n    n[{label}]\n")


def test_write_mermaid_fences_markdown_only(tmp_path):
    diagram = 'flowchart TD\n    a["A"]\n'
    assert write_mermaid(tmp_path / "p.md", diagram).read_text() == f"```mermaid\n{diagram}```\n"
    assert write_mermaid(tmp_path / "p.mmd", diagram).read_text() == diagram


def _jisu(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", JISU_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-m", "jisu.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_prints_only_the_diagram_and_refuses_two_things_on_stdout(tiny_llama_dir, tmp_path):
    proc = _jisu("profile", "--model", str(tiny_llama_dir), "--input-len", "8", "--output-len", "3", "--mermaid",
                 cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    labels = check_structure(proc.stdout)
    assert "n/a (run jisu calibrate)" in labels["attn"]  # an empty cache folder: no calibration
    assert "Engine steps by phase" in proc.stderr  # the tables still come, on stderr
    both = _jisu("profile", "--model", str(tiny_llama_dir), "--json", "--mermaid", cache=tmp_path)
    assert both.returncode != 0 and "--mermaid" in both.stderr and "Traceback" not in both.stderr
