"""Reading what users bring: checkpoints and their key names, add-on files, hashes, PNG metadata."""
