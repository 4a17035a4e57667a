"""The HTML viewer in headless Chromium: file size, first paint and slider updates on
GPT-2-small's full graph; screenshots of the viewer on stories260k circuits.

Usage:
    python benchmarks/bench_viewer.py [--stories ../shared/models/stories260k] \
        [--out benchmarks/results/viewer] [--figures benchmarks/results/figures]

GPT-2 small's graph (12 layers, 12 heads: 158 nodes, 32,491 edges) gets random scores (no
weights are needed: the viewer reads the graph and the scores); the circuit is its top 2,000
edges by |score|, and every edge is embedded so that the slider runs over the whole graph.
Measured in Chromium (Debian's package, driven by Playwright; ``circuitfind.testing.browser``),
medians over ``--repeats`` loads and over the slider moves:

- **file size** of ``view.html``, and the seconds Python takes to write it;
- **first paint**: from navigation start to the first contentful paint, to the end of the
  page's script (graph built, 2,000 edges drawn), and to the first frame after it (the graph
  on screen);
- **slider update**: moving the size between 1,000 and 3,000 edges, one move at a time (each
  100 ms after the last has settled, as a user's moves come): the script's handler with the
  style and layout it forces (``update``), until the next frame has been produced (``to next
  frame``, which includes waiting for the frame clock, up to ~16.7 ms), and the main thread's
  work for the move (Chrome's ``TaskDuration`` from the DevTools protocol); then the same
  moves back to back (a fast drag: each dispatched when the previous frame is out, so frames
  queue behind rasterisation); and one jump to every edge of the graph (32,491, creating the
  remaining paths). While the slider moves the page draws edges without anti-aliasing (a third
  of the raster work in software) and redraws them smooth 250 ms after the last move: these
  figures are for the frames while it moves.

With ``--stories`` it also discovers EAP and EAP-IG circuits on stories260k's
gendered-pronoun task and saves screenshots of the viewer (one circuit, an edge hovered, a
node pinned, the comparison) to ``--figures``. Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from _results import write_results  # benchmarks/_results.py (scripts run from benchmarks/)
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.graphs.selection import select_top_n
from circuitfind.testing.browser import chromium_page, find_chromium
from circuitfind.view import view

TIMING_JS = """async (k) => {
    const slider = document.getElementById('size');
    const t0 = performance.now();
    slider.value = k;
    slider.dispatchEvent(new Event('input', {bubbles: true}));
    document.body.offsetHeight;   // force style and layout of what changed
    const t1 = performance.now();
    const t2 = await new Promise(done => requestAnimationFrame(() => setTimeout(() => done(performance.now()), 0)));
    return [t1 - t0, t2 - t0, document.querySelectorAll('#edges path.edge:not(.off)').length];
}"""

PAINT_JS = """async () => {
    const frame = await new Promise(done => requestAnimationFrame(() => setTimeout(() => done(performance.now()), 0)));
    const fcp = performance.getEntriesByName('first-contentful-paint')[0];
    return {fcp: fcp ? fcp.startTime : null, ready: window.circuitView.readyStart + window.circuitView.readyMs,
            frame: frame, script: window.circuitView.readyMs};
}"""


def gpt2_circuit(n_edges: int, seed: int) -> tuple[ComputeGraph, object]:
    graph = ComputeGraph(12, 12, model_name="gpt2")
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(graph.n_senders, graph.n_receivers, generator=gen) * 0.1
    circuit = select_top_n(graph, scores, n_edges, metadata={
        "model": "gpt2 (random scores)", "task": "benchmark", "algorithm": "random",
        "metric_unit": "logits"})
    return graph, circuit


def bench_gpt2(args: argparse.Namespace, tmp: Path) -> dict:
    graph, circuit = gpt2_circuit(args.edges, args.seed)
    start = time.perf_counter()
    path = view(circuit, tmp / "gpt2.html")
    write_s = time.perf_counter() - start
    size = path.stat().st_size
    loads, moves, jump = [], [], None
    gen = torch.Generator().manual_seed(args.seed)
    with chromium_page() as page:
        for _ in range(args.repeats):
            page.goto(path.as_uri())
            page.wait_for_selector("body[data-ready]")
            loads.append(page.evaluate(PAINT_JS))
        assert page.console_errors == [], page.console_errors
        targets = [int(k) for k in torch.randint(1000, 3001, (args.moves,), generator=gen)]
        cdp = page.context.new_cdp_session(page)
        cdp.send("Performance.enable")

        def task_ms() -> float:
            metrics = cdp.send("Performance.getMetrics")["metrics"]
            return 1000 * next(m["value"] for m in metrics if m["name"] == "TaskDuration")

        for k in targets:  # one move at a time, as a user's: each after the last has settled
            page.wait_for_timeout(100)
            before = task_ms()
            update, frame, drawn = page.evaluate(TIMING_JS, k)
            page.wait_for_timeout(100)
            moves.append({"k": k, "update_ms": update, "frame_ms": frame,
                          "main_thread_ms": task_ms() - before})
            assert page.evaluate("window.circuitView.size()") == k
        # a drag: the same moves back to back, as fast as the page takes them
        start = time.perf_counter()
        for k in targets:
            page.evaluate(TIMING_JS, k)
        drag_ms = 1000 * (time.perf_counter() - start) / len(targets)
        update, frame, drawn = page.evaluate(TIMING_JS, graph.n_edges)
        jump = {"k": graph.n_edges, "update_ms": update, "frame_ms": frame, "paths": drawn}
    med = lambda rows, key: statistics.median(r[key] for r in rows if r[key] is not None)  # noqa: E731
    return {"graph_edges": graph.n_edges, "nodes": graph.n_nodes, "circuit_edges": circuit.n_edges,
            "html_bytes": size, "write_s": round(write_s, 3),
            "first_contentful_paint_ms": med(loads, "fcp"), "script_ms": med(loads, "script"),
            "first_frame_ms": med(loads, "frame"), "loads": loads,
            "update_ms_median": statistics.median(m["update_ms"] for m in moves),
            "update_ms_max": max(m["update_ms"] for m in moves),
            "frame_ms_median": statistics.median(m["frame_ms"] for m in moves),
            "frame_ms_max": max(m["frame_ms"] for m in moves),
            "main_thread_ms_median": statistics.median(m["main_thread_ms"] for m in moves),
            "drag_ms_per_move": drag_ms,
            "moves": moves, "jump_to_all": jump}


def screenshots(args: argparse.Namespace, tmp: Path) -> list[str]:
    import circuitfind as cf

    model = cf.load_model(args.stories)
    task = "gendered_pronoun"
    data = cf.build_data(model, task, 64, 0)
    eap = cf.discover(model, data=data, algorithm="eap", n_edges=args.stories_edges, curve=True)
    ig = cf.discover(model, data=data, algorithm="eap_ig", n_edges=args.stories_edges, curve=True)
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    one = view(eap, tmp / "eap.html")
    both = view(eap, tmp / "both.html", other=ig, labels=("EAP", "EAP-IG"))
    written = []
    with chromium_page(1400, 900) as page:
        page.goto(one.as_uri())
        page.wait_for_selector("body[data-ready]")
        shot = figures / "viewer_stories260k_eap.png"
        page.screenshot(path=str(shot))
        written.append(shot)
        # hover the strongest edge into an attention head's q/k/v input, where no other edge
        # lies on top of it
        point = page.evaluate("""() => {
            const paths = [...document.querySelectorAll('#edges path.edge:not(.off)')]
                .filter(p => window.circuitView.edgeName(+p.dataset.e).includes('<'))
                .sort((a, b) => a.dataset.e - b.dataset.e);
            for (const p of paths) for (const f of [0.5, 0.35, 0.65, 0.2, 0.8]) {
                const q = p.getPointAtLength(p.getTotalLength() * f).matrixTransform(p.getScreenCTM());
                if (document.elementFromPoint(q.x, q.y) === p) return [q.x, q.y];
            }
            return null; }""")
        page.mouse.move(*point)
        page.wait_for_timeout(400)
        shot = figures / "viewer_stories260k_hover.png"
        page.screenshot(path=str(shot))
        written.append(shot)
        page.fill("#search", "m2")
        page.press("#search", "Enter")
        page.click("#fit")
        page.wait_for_timeout(400)
        shot = figures / "viewer_stories260k_pinned.png"
        page.screenshot(path=str(shot))
        written.append(shot)
        page.goto(both.as_uri())
        page.wait_for_selector("body[data-ready]")
        shot = figures / "viewer_stories260k_compare.png"
        page.screenshot(path=str(shot))
        written.append(shot)
        assert page.console_errors == [], page.console_errors
    return [str(p) for p in written]


def markdown(result: dict) -> str:
    g = result["gpt2"]
    lines = [
        "# HTML viewer in headless Chromium",
        "",
        f"Machine: {result['machine']}; {result['chromium']}; Playwright {result['playwright']}.",
        f"GPT-2 small's full graph ({g['graph_edges']:,} edges, {g['nodes']} nodes), random "
        f"scores, circuit = top {g['circuit_edges']:,} edges by |score|, every edge embedded "
        f"(the slider reaches all {g['graph_edges']:,}). Medians over {result['repeats']} loads "
        f"and {result['moves']} slider moves between 1,000 and 3,000 edges.",
        "",
        "| measure | value | target |",
        "| --- | --- | --- |",
        f"| view.html size | {g['html_bytes'] / 1e6:.2f} MB ({g['html_bytes']:,} bytes) | ≤ 3 MB |",
        f"| first contentful paint | {g['first_contentful_paint_ms']:.0f} ms | |",
        f"| page script done (graph built, {g['circuit_edges']:,} edges drawn) | "
        f"{g['script_ms']:.0f} ms of script; ends at {g['loads'][0]['ready']:.0f} ms (first load) | |",
        f"| first frame with the graph (from navigation start) | {g['first_frame_ms']:.0f} ms "
        f"| < 1 s |",
        f"| slider update: handler + forced style/layout | median {g['update_ms_median']:.1f} "
        f"ms, max {g['update_ms_max']:.1f} ms | < 50 ms |",
        f"| slider update: until the next frame (incl. frame-clock wait) | median "
        f"{g['frame_ms_median']:.1f} ms, max {g['frame_ms_max']:.1f} ms | < 50 ms |",
        f"| slider update: main-thread work (script, style, layout, paint; CDP TaskDuration) "
        f"| median {g['main_thread_ms_median']:.1f} ms | |",
        f"| a drag: the same moves back to back, per move (next one dispatched after the "
        f"previous frame) | {g['drag_ms_per_move']:.1f} ms | |",
        f"| one jump to all {g['jump_to_all']['k']:,} edges (creates the remaining paths) | "
        f"{g['jump_to_all']['update_ms']:.0f} ms handler, {g['jump_to_all']['frame_ms']:.0f} ms "
        f"to the next frame | |",
        f"| Python: writing view.html | {g['write_s']:.2f} s | |",
        "",
        "While the slider moves, edges are drawn without anti-aliasing and redrawn smooth 250 ms "
        "after the last move; the slider figures are for the moving frames. Timings on this "
        "shared machine vary with its load (see the load average above).",
        "",
        "Reproduce: `python benchmarks/bench_viewer.py --stories ../shared/models/stories260k`.",
    ]
    if result.get("screenshots"):
        lines += ["", "Screenshots (stories260k, gendered pronoun, EAP and EAP-IG top "
                      f"{result['stories_edges']} edges):", ""]
        lines += [f"- `{Path(p).name}`" for p in result["screenshots"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--moves", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stories", default=None)
    parser.add_argument("--stories-edges", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/viewer")
    parser.add_argument("--figures", default="benchmarks/results/figures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from importlib.metadata import version

    chromium = find_chromium()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs shared with other "
                   f"jobs (load average {os.getloadavg()[0]:.1f} at the start)",
        "chromium": subprocess.run([chromium, "--version"], capture_output=True, text=True
                                   ).stdout.strip(),
        "playwright": version("playwright"), "repeats": args.repeats, "moves": args.moves,
        "stories_edges": args.stories_edges}
    with tempfile.TemporaryDirectory() as tmp:
        result["gpt2"] = bench_gpt2(args, Path(tmp))
        if args.stories:
            result["screenshots"] = screenshots(args, Path(tmp))
    write_results(args.out, result, markdown)


if __name__ == "__main__":
    main()
