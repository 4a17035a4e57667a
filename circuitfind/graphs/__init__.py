"""Computational graphs and circuits."""

from circuitfind.graphs.circuit import Circuit, prune_dangling, select_threshold, select_top_n
from circuitfind.graphs.graph import ComputeGraph, Node, Receiver
from circuitfind.graphs.mib import export_mib, import_mib
from circuitfind.graphs.render import render

__all__ = ["Circuit", "ComputeGraph", "Node", "Receiver", "export_mib", "import_mib", "prune_dangling", "render",
           "select_threshold", "select_top_n"]
