"""The entry tasks behind ``train.py``, ``evaluate.py`` and ``pseudo_label.py``: the thin layer that holds the
composed Hydra config and hands typed settings and built parts to the code below it."""
