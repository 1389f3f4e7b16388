"""Training: set-up (components), one optimizer step, the Trainer loop and its callbacks, the
optimizer, LR schedule, DeepSpeed engine, logging. Modules are imported by their own names."""
