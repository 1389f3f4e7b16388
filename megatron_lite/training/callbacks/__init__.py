"""Optional behaviour attached to the Trainer through the callback protocol."""
