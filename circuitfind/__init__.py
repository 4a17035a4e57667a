"""circuitfind: automated circuit discovery for transformer language models.

>>> import circuitfind as cf
>>> model = cf.load_model("gpt2")                      # or a local Hugging Face directory
>>> circuit = cf.discover(model, "ioi", algorithm="eap", n_edges=200)
>>> circuit.metadata["faithfulness"]["faithfulness"]
>>> circuit.render("ioi.svg"); circuit.save("ioi.json")
>>> cf.write_run(circuit, "runs/ioi")                 # circuit.json/.graphml, report.md, .svg, view.html
>>> cf.view(circuit, "ioi.html")                      # the interactive viewer, one HTML file
"""

from circuitfind.algorithms import ALGORITHMS, Algorithm, get_algorithm
from circuitfind.api import build_data, check, discover, export_mib, plan, score_edges
from circuitfind.benchmark import bench, leaderboard, tune
from circuitfind.errors import CircuitFindError
from circuitfind.evaluation import edge_roc, evaluate, faithfulness_curve, node_roc
from circuitfind.evaluation.compare import compare
from circuitfind.graphs import Circuit, ComputeGraph, import_mib
from circuitfind.graphs.render import RenderOptions
from circuitfind.models import load_model
from circuitfind.outputs import write_run
from circuitfind.patching import Ablation, PatchingEngine, path_patch
from circuitfind.tasks import TASKS, Task, TaskData, get_task, reference_circuit
from circuitfind.view import view
from circuitfind import zoo  # noqa: E402,F401  (registers the zoo: model source and references)

__version__ = "0.1.0"

__all__ = ["ALGORITHMS", "TASKS", "Ablation", "Algorithm", "Circuit", "CircuitFindError",
           "ComputeGraph", "PatchingEngine", "RenderOptions", "Task", "TaskData", "bench",
           "build_data", "check", "compare",
           "discover", "edge_roc", "evaluate", "export_mib", "faithfulness_curve",
           "get_algorithm", "get_task", "import_mib", "leaderboard", "load_model", "node_roc", "path_patch",
           "plan",
           "reference_circuit", "score_edges", "tune", "view", "write_run"]
