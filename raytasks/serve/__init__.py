"""The serve program: the label job's checkpoints behind an HTTP API on Ray Serve.

``serve run jobs/serve.yaml`` and the KubeRay manifests name ``raytasks.serve:build_app``.
"""

from raytasks.serve.config import DeploymentSpec, IngressSpec, ModelSetSpec, ServeArgs  # noqa: F401
from raytasks.serve.ingress import (  # noqa: F401 - the app's API
    ADMIN_KEY_ENV,
    SET_DEPLOYMENT,
    APIError,
    FaceAttrAPI,
    build_app,
    deployment_options,
)
from raytasks.serve.replicas import CheckpointChanged, ModelServer, SetServer  # noqa: F401
