"""Image similarity: data, models, losses, training, metrics and plots."""
