"""Built-in demo model: a procedural captioned dataset of flat shapes (`shapes`) and a
rule-based classifier (`classify`) that checks whether an image shows what its caption asked.

Neither module imports torch: the dataset is numpy only, deterministic from a seed.
"""
