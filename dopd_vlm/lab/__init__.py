"""The lab: what explores and demonstrates the pipeline, apart from it.

`demo` (`dopd-vlm demo`), `explore` (the notebooks' helpers), `testbeds` and `warmup` (the
reasoning testbeds and the supervised warm-ups that build their pairs), `tiny` (offline
random-weight pairs of the real architectures, `dopd-vlm make-tiny`). These modules import the
pipeline; nothing in the pipeline imports them.
"""
