"""Sampling: logit filters and random draws shared by the samplers (``varcore.sampling.draw``)."""
