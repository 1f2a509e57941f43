"""Episode rules shared by training and evaluation, independent of veRL."""
