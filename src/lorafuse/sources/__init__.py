"""Where a model comes from. Each source yields a Checkpoint: tensor references, config and files."""
