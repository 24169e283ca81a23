"""Labels, metrics and the evaluation of a committed scoring run against them."""
