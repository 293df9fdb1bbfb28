"""Feature selection: C4.5 information gain ratio ranking (DFS-Net) and a random baseline."""
from dfsnet.selection.scores import discretize, gain_ratio, gain_ratio_scores
from dfsnet.selection.selectors import GainRatioSelector, RandomSelector

__all__ = ["GainRatioSelector", "RandomSelector", "discretize", "gain_ratio", "gain_ratio_scores"]
