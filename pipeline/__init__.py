"""nightscore: a scheduled batch-prediction pipeline.

Stages are plain functions of plain inputs, one module each (``features``, ``train``,
``evaluate``, ``registry``, ``score``, ``publish``, ...). Nothing here imports Airflow:
the DAGs in ``dags/`` wire these functions, and the CLI and the tests call them directly.
"""

__version__ = "0.1.0"
