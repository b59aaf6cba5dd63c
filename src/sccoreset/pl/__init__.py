"""Plotting (coming with the trainer history)."""
