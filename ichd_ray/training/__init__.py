"""k-fold training on Ray Train: ``recipe`` is the whole flow; each other module owns one stage."""
