"""nightscore: a scheduled batch-prediction pipeline.

Stages are plain functions of plain inputs, one module each (``features``, ``train``,
``evaluate``, ``score``, ``publish``, ...). Nothing here imports Airflow: the DAGs in
``dags/`` wire these functions, and the CLI and the tests call them directly.

The modules sit in packages by layer, lowest first (``LAYERS``). A module imports from its
own package and the packages below it, never above, and no import, not even one inside a
function, closes a cycle (``tests/unit/test_layers.py``). ``synthetic`` is the simulated
world: it may use anything, and nothing else in the product imports it. The README's
"Layout" section draws the layers.
"""

__version__ = "0.1.0"

import os as _os

LAYERS = (
    "core",  # plain helpers: errors, keys, files, figures, progress, faults, paths
    "conf",  # what to run and where: the use case's files, the deployment's settings, URLs
    "store",  # the serving database: connections, locks, the run ledger, the model registry
    "stages",  # the night's stages: sources, features, windows, train, evaluate, score, publish
    "campaigns",  # the campaign, its audience policies, uplift, experiments, monitoring
    "reports",  # the HTML reports and the pages that serve them
    "run",  # the night as a whole, stage after stage in the ledger, and its alerts
    "faces",  # what people run: the CLI, the use case checks, the local Airflow
    "synthetic",  # the simulated warehouse, the demo, populations of known truth
)

# OpenMP threads that spin while they wait take the cores from every other process of a
# shared worker (and from each other): the trees' fit ran 2x slower at a load of 3 on two
# cores. Waiting threads sleep instead, unless the environment says otherwise; read by the
# OpenMP runtime when scikit-learn first loads it, after this.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
