"""Tasks: the glue from data to a trained model and back to text (translation here; other tasks
plug into the same :mod:`qkv.train` layer)."""
