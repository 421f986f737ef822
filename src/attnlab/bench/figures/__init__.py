"""Paper-figure scripts, each runnable as ``python -m attnlab.bench.figures.<name>``: DHA's conversion
error and grouping speeds (``dha``), differential attention against SDPA (``differential``), and the
CPU flash kernel's own ceiling under the block-sparse executor (``ceiling``). They sit above the
benchmark's floor (``measure``) and are not part of ``attnlab bench``."""
