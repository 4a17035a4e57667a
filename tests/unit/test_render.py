"""Unit tests of circuitfind.graphs.render: both renderers, every format, the options."""

from __future__ import annotations

import logging
import re
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from circuitfind.errors import CircuitFindError, ConfigError, UnknownNameError
from circuitfind.graphs import Circuit, ComputeGraph, prune_dangling, render, select_top_n
from circuitfind.graphs.render import (_FALLBACK_SAID, EDGE_COLOURS, SIGN_COLOURS,
                                       RenderOptions, _deterministic_pdf, _row_orders,
                                       resolve_renderer, scene, to_dot)

MHA = ComputeGraph(2, 4)
GQA = ComputeGraph(3, 4, 2)
MAGIC = {"svg": b"<?xml", "pdf": b"%PDF", "png": b"\x89PNG"}


def circuit(graph: ComputeGraph = MHA, classes: bool = True, n: int = 30) -> Circuit:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(graph.n_senders, graph.n_receivers, generator=gen)
    meta = {"model": "tiny", "task": "ioi", "algorithm": "eap"}
    if classes:
        meta["node_classes"] = {"a1.h0": "name mover", "a0.h1": "induction"}
    return select_top_n(graph, scores, n, metadata=meta)


@pytest.fixture(params=["graphviz", "matplotlib"])
def renderer(request):
    if request.param == "graphviz":
        request.getfixturevalue("with_dot")
    return request.param


# ------------------------------------------------------------------ both renderers
@pytest.mark.parametrize("fmt", ["svg", "pdf", "png"])
def test_same_circuit_same_bytes(tmp_path, renderer, fmt):
    c = circuit(GQA)
    a = render(c, tmp_path / f"a.{fmt}", renderer=renderer).read_bytes()
    b = render(c, tmp_path / f"b.{fmt}", renderer=renderer).read_bytes()
    assert a == b and len(a) > 1000
    assert a.startswith(MAGIC[fmt])
    if fmt == "pdf":
        assert b"CreationDate" not in a or b"D:19700101000000Z" in a


def test_svg_names_are_searchable_text(tmp_path, renderer):
    c = circuit()
    data = c.render(tmp_path / "c.svg", renderer=renderer).read_bytes()
    root = ET.fromstring(data)  # `<q>` in edge names is escaped properly
    assert root.tag.endswith("svg")
    texts = {"".join(t.itertext()).strip() for t in root.iter() if t.tag.endswith("text")}
    assert set(c.nodes) <= texts  # node names are <text>, not glyph paths
    assert any(f"&lt;{kind}&gt;" in data.decode() for kind in "qkv")
    # the same circuit rebuilt from its file draws the same bytes
    c.save(tmp_path / "c.json")
    again = Circuit.load(tmp_path / "c.json").render(tmp_path / "d.svg", renderer=renderer)
    assert again.read_bytes() == data


def test_renderers_draw_the_same_scene(tmp_path, with_dot):
    c = circuit(GQA, n=20)
    drawn = scene(c)
    svgs = [render(c, tmp_path / f"{r}.svg", renderer=r).read_text()
            for r in ("graphviz", "matplotlib")]
    for svg in svgs:
        attributes = " ".join(v for el in ET.fromstring(svg).iter() for v in el.attrib.values())
        for edge in drawn.edges:  # every scene edge is named (tooltip / SVG id) in both
            assert edge.name in attributes
        for colour in {e.colour for e in drawn.edges}:
            assert colour.lower() in svg.lower()


def test_matplotlib_only_needs_pip_packages(tmp_path, without_dot, caplog):
    _FALLBACK_SAID.clear()
    c = circuit()
    with caplog.at_level(logging.WARNING, logger="circuitfind"):
        first = render(c, tmp_path / "a.svg").read_bytes()  # automatic choice
        render(c, tmp_path / "b.png")
    assert first == render(c, tmp_path / "c.svg", renderer="matplotlib").read_bytes()
    notes = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert len(notes) == 1 and "not found" in notes[0]  # said once
    assert resolve_renderer(None) == "matplotlib"


def test_graphviz_without_dot_names_the_fallback(tmp_path, without_dot):
    with pytest.raises(CircuitFindError, match="--renderer matplotlib"):
        render(circuit(), tmp_path / "c.svg", renderer="graphviz")
    assert not (tmp_path / "c.svg").exists()
    assert render(circuit(), tmp_path / "c.dot").exists()  # DOT needs no binary


def test_auto_prefers_graphviz(with_dot):
    assert resolve_renderer(None) == resolve_renderer("auto") == "graphviz"


def test_pdf_dates_fixed_in_place():
    data = b"<< /CreationDate (D:20261121001701Z) /ModDate (D:20261121001701+01'00') >>"
    fixed = _deterministic_pdf(data)
    assert len(fixed) == len(data) and b"2026" not in fixed
    assert b"/CreationDate (D:19700101000000Z)" in fixed


# ------------------------------------------------------------------ the scene and DOT
def test_dot_source(tmp_path):
    c = circuit(GQA)
    path = render(c, tmp_path / "c.dot")
    source = path.read_text()
    assert source == to_dot(c) == render(c, tmp_path / "c2.gv").read_text()
    assert source.startswith("digraph circuit {")
    assert '"a1.h0"' in source  # node IDs with dots are quoted
    assert "rank=source" in source and "rank=sink" in source and "rank=same" in source
    for line in source.splitlines():
        if "->" in line and "tooltip" in line and "style=invis" not in line:
            # every drawn edge has a colour from the palette and a pen width in [0.5, 5]
            assert any(colour in line for colour in EDGE_COLOURS.values())
            width = float(line.split("penwidth=")[1].split()[0].strip('"'))
            assert 0.5 <= width <= 5.0
    assert "name mover" in source and "legend" in source
    # a GQA k/v edge is drawn to the query heads of its group that lead on (have a drawn
    # outgoing edge), or to all of them when none does
    kv_edges = [e for e in c.edges if ".kv" in e]
    assert kv_edges
    sc = scene(c)
    senders = {e.sender for e in sc.edges}
    for name in kv_edges:
        group = GQA.receivers[GQA.receiver_index(name.split("->")[1])].nodes
        live = [h for h in group if h in senders]
        assert sorted(e.target for e in sc.edges if e.name == name) == sorted(live or group)
        assert source.count(f'tooltip="{name} ') == len(live or group)


def test_widths_scale_with_scores_and_no_scores():
    c = Circuit.from_edges(MHA, ["input->logits", "m1->logits"],
                           scores={"input->logits": -4.0, "m1->logits": 1.0})
    source = to_dot(c)
    assert "penwidth=5.000" in source and "penwidth=1.625" in source
    plain = to_dot(Circuit.from_edges(MHA, ["input->logits"]))
    assert "penwidth=1.000" in plain
    assert "edges" in to_dot(Circuit.empty(MHA))  # an empty circuit still renders


def test_rows_follow_layers():
    drawn = scene(circuit(GQA, n=60))
    rows = {n.name: n.row for n in drawn.nodes}
    assert rows["input"] == 0 and rows["logits"] == drawn.n_rows - 1
    for name, row in rows.items():
        if name.startswith("m"):  # an MLP sits below its own layer's heads
            heads = [r for n, r in rows.items() if n.startswith(f"a{name[1:]}.")]
            assert all(r < row for r in heads)
    for edge in drawn.edges:
        assert rows[edge.sender] < rows[edge.target]


def test_node_fills_by_kind_without_classes():
    source = to_dot(circuit(classes=False))
    assert "#56B4E9" in source  # attention fill
    assert "legend.class" not in source


def test_collapse_qkv_sums_the_scores():
    c = circuit(MHA, n=80)
    sc = scene(c, RenderOptions(collapse_qkv=True))
    scores = c.edge_scores()
    collapsed = [e for e in sc.edges if e.key == "qkv"]
    assert collapsed and not any(e.key in ("q", "k", "v") for e in sc.edges)
    for edge in collapsed:
        parts = [v for name, v in scores.items()
                 if name.startswith(f"{edge.sender}->{edge.target}<")]
        assert edge.score == pytest.approx(sum(parts), abs=1e-6)
    assert len({(e.sender, e.target) for e in collapsed}) == len(collapsed)
    assert ("q/k/v input", EDGE_COLOURS["qkv"]) in sc.edge_legend


@pytest.mark.parametrize("options", [RenderOptions(), RenderOptions(collapse_qkv=True),
                                     RenderOptions(top_n=8),
                                     RenderOptions(top_n=8, collapse_qkv=True)],
                         ids=["edges", "collapsed", "top", "top-collapsed"])
def test_no_head_shows_inputs_without_outputs_because_of_its_group(options):
    # a pruned circuit has a way on from every receiver it keeps; a grouped-query k/v edge is
    # shared by the query heads of its group, and drawing it into a head that does not lead
    # on would show that head with inputs and no outputs (collapsed q/k/v did, 51 of 360)
    drawn_kv = 0
    for seed in range(12):
        scores = torch.randn(GQA.n_senders, GQA.n_receivers,
                             generator=torch.Generator().manual_seed(seed))
        for n in (10, 30, 60):
            c = prune_dangling(select_top_n(GQA, scores, n))
            sc = scene(c, options)
            senders = {e.sender for e in sc.edges}
            assert {e.target for e in sc.edges} - senders <= {"logits"}, (seed, n)
            drawn_kv += sum(".kv" in e.name or e.key == "qkv" for e in sc.edges)
            if not options.collapse_qkv and options.top_n is None:  # nothing lost
                assert {e.name for e in sc.edges} == set(c.edges)
    assert drawn_kv > 0


def test_unpruned_group_without_a_head_leading_on():
    """A k/v edge whose group has no head leading on (an unpruned circuit) goes into the
    heads drawn anyway for their own q input, else into the whole group."""
    names = ["input->a1.h1<q>", "input->a1.kv0<k>", "input->a1.kv1<v>", "m0->logits",
             "input->m0"]
    sc = scene(Circuit.from_edges(GQA, names))
    targets = {name: sorted(e.target for e in sc.edges if e.name == name) for name in names}
    assert targets["input->a1.kv0<k>"] == ["a1.h1"]  # not a1.h0: it has no input of its own
    assert targets["input->a1.kv1<v>"] == ["a1.h2", "a1.h3"]  # nothing to prefer: all


def test_filters_by_score():
    c = circuit(MHA, n=60)
    magnitudes = sorted((abs(v) for v in c.edge_scores().values()), reverse=True)
    top = scene(c, RenderOptions(top_n=10))
    # the top 10 by |score|, less the edges left dangling once the others are hidden (as
    # prune_dangling would leave them): no node is drawn without a way in and a way on
    names = sorted(c.edge_scores(), key=lambda n: -abs(c.edge_scores()[n]))[:10]
    pruned = prune_dangling(Circuit.from_edges(MHA, names, scores=c.scores))
    assert {e.name for e in top.edges} == set(pruned.edges) and 0 < len(top.edges) <= 10
    assert top.title.endswith(f"60/{MHA.n_edges} edges ({len(top.edges)} drawn)")
    for node in {e.sender for e in top.edges} - {"input"}:
        assert any(e.target == node for e in top.edges), node
    for node in {e.target for e in top.edges} - {"logits"}:
        assert any(e.sender == node for e in top.edges), node
    assert all(abs(e.score) >= magnitudes[9] - 1e-6 for e in top.edges)
    cut = magnitudes[20]
    above = scene(c, RenderOptions(min_abs_score=cut))
    assert len(above.edges) <= 21 and all(abs(e.score) >= cut for e in above.edges)
    # nodes of hidden edges are hidden too; the widest edge keeps the full width
    assert {n.name for n in top.nodes} == {e.sender for e in top.edges} | {
        e.target for e in top.edges}
    assert max(e.width for e in top.edges) == 5.0
    with pytest.raises(ConfigError, match="scores"):
        scene(Circuit.from_edges(MHA, ["input->logits"]), RenderOptions(top_n=3))


def test_colour_by_sign_follows_the_metric_direction():
    names = ["input->logits", "m1->logits"]
    scores = {"input->logits": -2.0, "m1->logits": 1.0}
    up = Circuit.from_edges(MHA, names, scores=scores, metadata={"task": "ioi"})
    colours = {e.name: e.colour for e in scene(up, RenderOptions(edge_colour="sign")).edges}
    # score = metric(without edge) - metric(full): -2 means the edge raises the metric
    assert colours == {"input->logits": SIGN_COLOURS["helps"], "m1->logits": SIGN_COLOURS["hurts"]}
    down = up.with_metadata(higher_is_better=False)
    colours = {e.name: e.colour for e in scene(down, RenderOptions(edge_colour="sign")).edges}
    assert colours == {"input->logits": SIGN_COLOURS["hurts"], "m1->logits": SIGN_COLOURS["helps"]}
    unknown = scene(up.with_metadata(task=None), RenderOptions(edge_colour="sign"))
    assert [label for label, _ in unknown.edge_legend] == ["score < 0", "score > 0"]


def test_sign_legend_reads_the_scores_meaning():
    """Importances (ACDC's KL effects): a positive score marks an edge the circuit needs, and the
    legend names the KL divergence, not the metric; a prompt-file task's metric changes read
    'helps / hurts the metric' from the circuit's own metadata (no registered task to ask)."""
    names = ["input->logits", "m1->logits"]
    scores = {"input->logits": -2.0, "m1->logits": 1.0}
    acdc = Circuit.from_edges(MHA, names, scores=scores, metadata={
        "algorithm": "acdc", "scores": {"kind": "importance", "unit": "nats",
                                        "what": "the KL divergence to the full model"}})
    sc = scene(acdc, RenderOptions(edge_colour="sign"))
    assert {e.name: e.colour for e in sc.edges} == {"input->logits": SIGN_COLOURS["hurts"],
                                                    "m1->logits": SIGN_COLOURS["helps"]}
    legend = [label for label, _ in sc.edge_legend]
    assert legend[:2] == ["important (removing it raises the KL divergence to the full model)",
                          "removing it lowers the KL divergence to the full model"]
    assert not any("metric" in label for label in legend)
    # an ACDC circuit saved before circuits declared their scores: inferred from the algorithm
    old = acdc.replace(metadata={"algorithm": "acdc", "algorithm_params": {"objective": "kl"}})
    assert [label for label, _ in scene(old, RenderOptions(edge_colour="sign")).edge_legend
            ] == legend
    prompts = Circuit.from_edges(MHA, names, scores=scores, metadata={
        "task": "my_prompts", "task_source": "prompts.jsonl", "metric": "logit difference",
        "higher_is_better": True})
    sc = scene(prompts, RenderOptions(edge_colour="sign"))
    assert [label for label, _ in sc.edge_legend][:2] == ["helps the metric", "hurts the metric"]
    assert {e.name: e.colour for e in sc.edges} == {"input->logits": SIGN_COLOURS["helps"],
                                                    "m1->logits": SIGN_COLOURS["hurts"]}


def test_labels_title_orientation():
    c = circuit(MHA)
    plain = to_dot(c)
    paper = to_dot(c, RenderOptions(head_labels="layer.head", title=False,
                                    orientation="landscape"))
    assert "rankdir=TB" in plain and "rankdir=LR" in paper
    assert "edges" in plain and "/190 edges" not in paper
    assert re.search(r'"a1\.h0" \[label="?1\.0"?', paper)
    assert re.search(r'"a1\.h0" \[label="?a1\.h0"?', plain)


def test_fixed_order_gives_every_head_a_slot():
    small, large = circuit(MHA, n=5), circuit(MHA, n=60)
    for c in (small, large):
        sc = scene(c, RenderOptions(fixed_order=True))
        assert sc.n_rows == 2 + 2 * MHA.n_layers
        pos = _row_orders(sc)
        for node in sc.nodes:
            if node.kind == "attention":  # the same place whatever the circuit
                assert pos[node.name] == node.slot - (MHA.n_heads - 1) / 2
        source = to_dot(c, RenderOptions(fixed_order=True))
        placeholders = set(re.findall(r"slot\.\d+\.[\dx]+", source))
        slots = MHA.n_layers * MHA.n_heads + MHA.n_layers + 2  # heads, MLPs, input, logits
        assert len(placeholders) == slots - len(sc.nodes)
        # heavy invisible edges join each head slot to the same slot one layer down
        columns = re.findall(r'"?([\w.]+)"? -> "?([\w.]+)"? \[style=invis weight=100\]', source)
        drawn = {n.name for n in sc.nodes}

        def at(layer, head):
            name = f"a{layer}.h{head}"
            return name if name in drawn else f"slot.{1 + 2 * layer}.{head}"

        for head in range(MHA.n_heads):
            assert (at(0, head), at(1, head)) in columns


@pytest.mark.parametrize("options, message", [
    (dict(edge_colour="rainbow"), "edge_colour"),
    (dict(orientation="sideways"), "orientation"),
    (dict(head_labels="short"), "head_labels"),
    (dict(top_n=-1), "top_n"),
    (dict(min_abs_score=-0.5), "min_abs_score"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        RenderOptions(**options)


def test_bad_suffix_format_renderer_and_directory(tmp_path):
    c = circuit()
    with pytest.raises(ConfigError, match=r"suffix.*\.pdf.*\.png.*\.svg"):
        render(c, tmp_path / "c.jpeg")
    with pytest.raises(ConfigError, match="suffix"):
        c.render(tmp_path / "c")
    with pytest.raises(ConfigError, match=r"\['dot', 'pdf', 'png', 'svg'\]"):
        render(c, tmp_path / "c.svg", format="bmp")
    with pytest.raises(UnknownNameError, match="graphviz, matplotlib"):
        render(c, tmp_path / "c.svg", renderer="plotly")
    with pytest.raises(ConfigError, match="Circuit"):
        render("not a circuit", tmp_path / "c.svg")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="does not exist"):
        render(c, tmp_path / "missing" / "c.svg")
    out = render(c, tmp_path / "c.txt", format="dot")
    assert out.read_text().startswith("digraph")


def test_missing_packages(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "graphviz", None)
    with pytest.raises(CircuitFindError, match="pip install graphviz"):
        render(circuit(), tmp_path / "c.dot")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(CircuitFindError, match="pip install matplotlib"):
        render(circuit(), tmp_path / "c.svg", renderer="matplotlib")


def test_heads_stand_in_index_order_and_titles_name_models_not_paths():
    from circuitfind.graphs.render import _row_orders, model_display_name

    c = circuit(MHA, n=60).with_metadata(model="/work/shared/models/stories260k")
    sc = scene(c)
    assert "model: stories260k" in sc.title and "/work" not in sc.title
    assert model_display_name("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    pos = _row_orders(sc)  # the matplotlib layout
    for row in {n.row for n in sc.nodes}:
        heads = sorted((n for n in sc.nodes if n.row == row and n.kind == "attention"),
                       key=lambda n: pos[n.name])
        assert [n.slot for n in heads] == sorted(n.slot for n in heads)
    source = to_dot(c)  # Graphviz: consecutive heads of a row chained left to right
    for row in {n.row for n in sc.nodes}:
        heads = sorted((n for n in sc.nodes if n.row == row and n.kind == "attention"),
                       key=lambda n: n.slot)
        for left, right in zip(heads, heads[1:]):
            assert f'"{left.name}" -> "{right.name}" [style=invis]' in source


def test_leaderboard_colours_belong_to_algorithms():
    from circuitfind.benchmark.leaderboard import algorithm_styles

    one = algorithm_styles(["eap", "acdc"])
    two = algorithm_styles(["acdc", "exact", "eap_ig(steps=5)", "eap_ig(steps=10)", "eap"])
    assert one["eap"][0] == two["eap"][0] and one["acdc"][0] == two["acdc"][0]
    assert two["eap_ig(steps=5)"][0] == two["eap_ig(steps=10)"][0]  # one colour, two markers
    assert two["eap_ig(steps=5)"][1:] != two["eap_ig(steps=10)"][1:]
    assert len({two[a][0] for a in ("acdc", "exact", "eap", "eap_ig(steps=5)")}) == 4


def test_leaderboard_figures_name_models_and_keep_algorithm_colours(tmp_path):
    from circuitfind.benchmark.leaderboard import ALGORITHM_COLOURS, plot_curves
    from circuitfind.graphs.render import OKABE_ITO

    def row(algorithm, model):
        return {"task": "ioi", "model": model, "n_examples": 8, "ablation": "resample",
                "algorithm": algorithm, "n_edges": 100, "convention": "mib",
                "fractions": [0.1, 0.5, 1.0], "faithfulness_mean": [0.2, 0.6, 1.0],
                "faithfulness_std": [None, None, None]}

    svgs = []
    for algorithms in (["acdc", "eap"], ["eap", "exact", "acdc"]):
        rows = [row(a, "/work/shared/models/stories260k") for a in algorithms]
        svgs.append(plot_curves(rows, tmp_path / f"{len(rows)}.svg").read_text())
    for svg, algorithms in zip(svgs, (["acdc", "eap"], ["eap", "exact", "acdc"])):
        assert "ioi on stories260k" in svg and "/work/shared" not in svg
        for algorithm in algorithms:  # the same colour in both figures
            assert OKABE_ITO[ALGORITHM_COLOURS[algorithm]].lower() in svg.lower()
