"""Tools: streaming training and prediction."""
