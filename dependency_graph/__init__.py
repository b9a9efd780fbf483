"""dependency_graph: coupled-channel groups for structured pruning (DepGraph / SPA style).

Not built yet: see the tracker's structured-pruning issue. Nothing imports this package.
"""
