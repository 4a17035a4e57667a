"""The interactive viewer: one self-contained HTML file per circuit or pair of circuits
(:func:`view`); the slider's edge order (:func:`view_order`)."""

from circuitfind.view.html import view, view_html
from circuitfind.view.order import VIEW_RANKING, rank_scores, view_order

__all__ = ["view", "view_html", "view_order", "rank_scores", "VIEW_RANKING"]
