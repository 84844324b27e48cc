"""MLflow: the run tracker with dataset inputs and model logging (``tracker``), the model registry and its promotion
gate (``registry``). Nothing here imports Prefect."""
