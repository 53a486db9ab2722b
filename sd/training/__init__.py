"""Training the built-in demo model: its drawn world, the training run, and the evaluation of its images."""
