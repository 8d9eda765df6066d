"""Training data: text (and, with the vision extra, images)."""
