"""nightscore: a scheduled batch-prediction pipeline.

Stages are plain functions of plain inputs, one module each (``features``, ``train``,
``evaluate``, ``registry``, ``score``, ``publish``, ...). Nothing here imports Airflow:
the DAGs in ``dags/`` wire these functions, and the CLI and the tests call them directly.
"""

__version__ = "0.1.0"

import os as _os

# OpenMP threads that spin while they wait take the cores from every other process of a
# shared worker (and from each other): the trees' fit ran 2x slower at a load of 3 on two
# cores. Waiting threads sleep instead, unless the environment says otherwise; read by the
# OpenMP runtime when scikit-learn first loads it, after this.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
