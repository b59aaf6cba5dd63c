"""Plotting: coreset composition, per-class F1 trajectories, training dynamics and loss."""

from ._plots import chunk_distribution, f1_trajectories, loss, training_dynamics

__all__ = ["chunk_distribution", "f1_trajectories", "loss", "training_dynamics"]
