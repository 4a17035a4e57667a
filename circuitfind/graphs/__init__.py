"""Computational graphs and circuits."""

from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.graph import ComputeGraph, Node, Receiver
from circuitfind.graphs.io import export_mib, import_mib
from circuitfind.graphs.render import render
from circuitfind.graphs.selection import prune_dangling, select_threshold, select_top_n

__all__ = ["Circuit", "ComputeGraph", "Node", "Receiver", "export_mib", "import_mib", "prune_dangling", "render",
           "select_threshold", "select_top_n"]
