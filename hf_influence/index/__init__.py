"""The influence index: training features stored once, exact top-k influence queries (`Influence.build_index`, `Influence.query`)."""

from .build import IndexBuild, build_index, index_method
from .search import APPROXIMATE_THRESHOLD, DIRECTIONS, TopInfluences, query_index, search
from .store import INDEX_METHODS, InfluenceIndex, load_index

__all__ = [
    "APPROXIMATE_THRESHOLD", "DIRECTIONS", "INDEX_METHODS", "IndexBuild", "InfluenceIndex", "TopInfluences", "build_index",
    "index_method", "load_index", "query_index", "search",
]
