"""Training data from a features file: splits, normalisation, segments and the Dataset."""
