"""GILL-Next-CN: teach a frozen Kolors stack captioning, retrieval and layout-controlled generation.

Entry points: ``train_ds.py`` (training), ``python -m gill.annotate`` (layout data), ``python -m gill.inference``,
``python -m gill.tools.params`` (parameter tables), ``python -m gill.tools.plan`` (memory planner).
"""

from gill import quiet as _quiet

_quiet.install()  # known harmless third-party warnings only, each by its message (gill/quiet.py)
