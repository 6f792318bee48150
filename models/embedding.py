"""A face embedding per face: dlib's 128-D face-recognition descriptor (``models/dlib_resnet.py``), for
finding the same person across a bucket, deduplicating or clustering.

The network is the one the face backbone uses, with dlib's own weights (``face-recognition-models``, CC0,
checked by sha256); never a checkpoint's fine-tuned copy, so two outputs labelled with different model sets
have comparable embeddings. Its input is dlib's 150×150 face chip with 25 % padding, which
``faces.align`` cuts from the detected five points with :func:`models.backbones.dlib_preprocessing`'s
template, as for any model.

The descriptor is dlib's, not L2-normalised: dlib's rule is that two faces whose descriptors are less than
0.6 apart (Euclidean) are the same person (99.38 % on LFW with dlib's own alignment). It is computed in
float32 whatever the label job's ``--precision``: bf16 moves descriptors by about 1e-2, a visible fraction of
that 0.6 margin, and the network is small (5.6 M parameters, 7 ms per face on one CPU thread).

Unlike a model's weights, these have no random fallback: an embedding from random weights would be
noise that looks like data, so :class:`FaceEmbedder` refuses to start when the package is absent.
"""

from __future__ import annotations

import torch

from .backbones import dlib_preprocessing
from .dlib_resnet import DESCRIPTOR_DIM, PACKAGE, PACKAGE_VERSION, SHA256, dlib_face_resnet, package_file
from .preprocess import normalize

EMBEDDING_DIM = DESCRIPTOR_DIM
SAME_PERSON_DISTANCE = 0.6  # dlib's threshold on the Euclidean distance of two descriptors


class EmbeddingUnavailable(RuntimeError):
    """The pretrained face network is not installed."""


def embedding_identity() -> str:
    """What lands in the output's provenance: the network and its weights' hash."""
    return f"dlib_face_recognition_resnet_model_v1 sha256:{SHA256[:16]}"


class FaceEmbedder:
    """dlib's face-recognition network, loaded once: uint8 (N, 3, 150, 150) chips -> (N, 128) descriptors."""

    def __init__(self, device: str | torch.device = "cpu", batch: int = 256):
        if package_file() is None:
            raise EmbeddingUnavailable(f"face embeddings need dlib's face network from {PACKAGE}=={PACKAGE_VERSION} "
                                       "(installed with this project: pip install -e .)")
        net, loaded = dlib_face_resnet("package")
        if not loaded:  # pragma: no cover - package_file() said it is there
            raise EmbeddingUnavailable(f"{PACKAGE} could not be loaded")
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.preprocessing = dlib_preprocessing(150)
        self.identity = embedding_identity()
        self.batch = int(batch)

    @torch.inference_mode()
    def embed(self, chips: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, 150, 150) on any device -> float32 (N, 128) on the CPU, in chunks of ``batch``."""
        if len(chips) == 0:
            return torch.zeros((0, EMBEDDING_DIM), dtype=torch.float32)
        out = []
        for i in range(0, len(chips), self.batch):
            x = normalize(chips[i:i + self.batch].to(self.device), self.preprocessing)
            out.append(self.net(x).float().cpu())
        return torch.cat(out)


def distance(a, b) -> float:
    """Euclidean distance of two descriptors (lists or tensors): below :data:`SAME_PERSON_DISTANCE`, the
    same person by dlib's rule."""
    return float(torch.linalg.vector_norm(torch.as_tensor(a, dtype=torch.float32) - torch.as_tensor(b, dtype=torch.float32)))
