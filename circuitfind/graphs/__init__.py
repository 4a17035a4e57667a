"""Computational graphs and circuits."""

from circuitfind.graphs.graph import ComputeGraph, Node, Receiver

__all__ = ["ComputeGraph", "Node", "Receiver"]
