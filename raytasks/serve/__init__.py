"""The serve program: the label job's checkpoints behind an HTTP API on Ray Serve.

* app.py: :func:`build_app` (``serve run jobs/serve.yaml`` and the KubeRay manifests name
  ``raytasks.serve:build_app``) and why the application is built as it is;
* ingress.py: ``FaceAttrAPI``, the HTTP front (checks, reading, decoding); bodies.py: how it reads a request's
  body; http.py: its errors, response models, budgets and bounded stream;
* replicas.py: ``AnnotatorServer``, the deployment that holds checkpoints and computes;
* config.py: :class:`ServeArgs`, the application's settings.
"""

from raytasks.serve.app import SET_DEPLOYMENT, build_app, deployment_options  # noqa: F401 - the app's API
from raytasks.serve.config import DeploymentSpec, IngressSpec, ModelSetSpec, ServeArgs  # noqa: F401
from raytasks.serve.http import APIError  # noqa: F401
from raytasks.serve.ingress import ADMIN_KEY_ENV, FaceAttrAPI  # noqa: F401
from raytasks.serve.replicas import AnnotatorServer, CheckpointChanged  # noqa: F401
