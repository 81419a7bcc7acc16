"""Online serving of the champion: Open Inference Protocol v2, /predict, metrics, hot reload.

Entry points: `create_app` (an ASGI app), `run` (uvicorn), `ServeSettings`.
"""

from sluicegate.serve.app import ServingApp, create_app, run
from sluicegate.serve.settings import ServeSettings

__all__ = ["ServeSettings", "ServingApp", "create_app", "run"]
