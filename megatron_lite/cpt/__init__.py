"""Continued pretraining (``cpt_llama.py``): the config resolved against a base checkpoint, the
base's weights loaded into the model (vocabulary growth, freezing), and the plug-ins it gives
the Trainer (model set-up, resume fallback to the base's optimizer state)."""
