"""One checkpoint on its device: uint8 inputs -> raw outputs -> the columns its output description names.

:class:`ModelRunner` is what the annotator (core/annotator.py) holds per model: the checkpoint loaded once,
batch norm folded into the convolutions, ``channels_last`` and bf16 autocast where they pay, optionally
``torch.compile``, and forward passes of at most ``max_batch`` images (bounded activations on a GPU); each face
read with its mirror image too where the checkpoint says so (``mirror``; twice the model's work).
"""

from __future__ import annotations

import contextlib
import logging
import sys

import torch

from models.checkpoint import load_checkpoint
from models.inference import fold_batchnorm

log = logging.getLogger(__name__)


def ray_worker_gpu_ids() -> list | None:
    """The GPUs Ray assigned this process when it is a Ray worker (a task, a label actor, a Serve replica):
    an empty list when it was given none; None outside a Ray worker (a plain script, a bench, the tests, a
    Ray driver). Ray is not imported for this: a worker always has it loaded."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    if ray._private.worker.global_worker.mode != ray._private.worker.WORKER_MODE:
        return None
    return list(ray.get_gpu_ids())


def resolve_device(device: str | None = None) -> torch.device:
    """``device`` when given; else ``cuda`` where torch sees a GPU, ``cpu`` otherwise, except in a Ray worker,
    which gets ``cuda`` only when Ray assigned it a GPU (``ray.get_gpu_ids()``). Ray (2.60 here) leaves a
    worker given no GPU (``num_gpus=0``: the label job's CPU actors, a Serve replica's default) the node's
    ``CUDA_VISIBLE_DEVICES`` (ray-project/ray#54868: ``set_visible_accelerator_ids`` in
    ray/_private/utils.py skips a resource with no ids unless ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1``, see
    ray/_private/accelerators/accelerator.py), so torch sees every GPU of the node: such a worker would load
    its models on ``cuda:0`` without reserving it, next to the work that did."""
    if device:
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    assigned = ray_worker_gpu_ids()
    return torch.device("cpu" if assigned is not None and not assigned else "cuda")


def limit_gpu_memory(device: torch.device, gpu_share: float | None) -> bool:
    """A worker given a fraction ``gpu_share`` < 1 of a GPU (a label actor's ``--gpus-per-actor 0.5``, a
    replica's ``num_gpus: 0.5``) gets that fraction of the card's memory for torch's caching allocator
    (``torch.cuda.set_per_process_memory_fraction``): Ray's fractional GPUs are a scheduling count and do not
    bound what a process allocates, so two 0.5-GPU workers could otherwise run the card out of memory
    together. Call it once, before the process's first allocation on the device. A whole GPU (or more), no
    share, or a device that is not CUDA: nothing is set. Returns whether a limit was set."""
    if device.type != "cuda" or not gpu_share or gpu_share >= 1:
        return False
    torch.cuda.set_per_process_memory_fraction(float(gpu_share), device)
    log.info("%s: torch may use %.0f%% of the GPU's memory (this worker's share of the GPU: %g)", device,
             100 * gpu_share, gpu_share)
    return True


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX tiles, as torch's oneDNN sees them).
    Without it oneDNN emulates bf16, and autocast is far slower than fp32: a ResNet-50, batch 32, 218x178,
    2 threads measured 10.5 images/s fp32 against 0.6 bf16 on an AVX2-only AMD EPYC (2026-12-04), where a
    CPU with AVX-512 BF16 gave bf16 about 3x fp32 (docs/benchmarks.md)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()  # torch pinned: both exist


def gpu_has_bf16(device: torch.device | str | int | None = None) -> bool:
    """Whether the CUDA GPU ``device`` (default: the current one) computes bfloat16 natively: compute
    capability 8.0 and up (A100, A10, L4, H100, ...). ``torch.cuda.is_bf16_supported()`` also says True on a
    V100 (sm_70) or T4 (sm_75), where bf16 is emulated and slower than fp32 (its ``including_emulation``
    defaults to True, torch/cuda/__init__.py); this is its ``including_emulation=False`` answer for the given
    device. False where torch sees no GPU."""
    if not torch.cuda.is_available():
        return False
    if torch.version.hip:  # ROCm: torch counts every AMD architecture it supports
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """``fp32`` -> None (no autocast); ``bf16`` -> bfloat16 (asked for: used even where it is slow);
    ``auto`` -> bf16 on a GPU (:func:`gpu_has_bf16`: compute capability 8.0 and up, not a V100 or T4 that only
    emulate it) and on a CPU (:func:`cpu_has_bf16`) that compute it natively, fp32 otherwise (ARM CPUs included:
    not measured here)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError("precision must be auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if gpu_has_bf16(device) else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None


class ModelRunner:
    """One checkpoint loaded once on its device: uint8 inputs -> raw outputs -> the model's columns.
    ``gpu_share``: the fraction of a GPU this process was given (:func:`limit_gpu_memory`)."""

    def __init__(self, checkpoint: str, device: str | None = None, precision: str = "auto",
                 channels_last: bool = True, threads: int | None = None, fold_bn: bool = True,
                 compile_batch: int | None = None, max_batch: int = 256, mirror: bool | None = None,
                 gpu_share: float | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        limit_gpu_memory(self.device, gpu_share)  # before the weights are the first allocation there
        self.model, self.info = load_checkpoint(checkpoint)
        if mirror is not None:  # None: as the checkpoint says (models/preprocess.py ``mirror``)
            self.model.set_mirror(mirror)
        self.model.to(self.device).eval()
        self.folded: list[str] = []
        if fold_bn:  # conv+bn folded: same outputs, fewer kernels (models/inference.py)
            pre = self.model.preprocessing
            example = torch.randint(0, 256, (2, pre.channels, *pre.size), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(0))
            self.model, self.folded = fold_batchnorm(self.model, self.model.prepare(example.to(self.device)))
        self.channels_last = channels_last and self.device.type in ("cuda", "cpu")
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.preprocessing = self.model.preprocessing
        self.output_fields = self.model.outputs.fields()
        self.architecture = self.info.model
        self.checkpoint_hash = self.info.hash
        self.compile_batch = compile_batch
        # the most images of one forward pass: the faces of a batch of photos (up to batch x max_faces) run in
        # chunks of this many, which bounds the activations' memory on a GPU whatever the photos hold
        self.max_batch = int(max_batch)
        self.forward_fn = self.model
        if compile_batch:
            self._compile(compile_batch)

    def _compile(self, batch: int) -> None:
        """``torch.compile`` (Inductor, with weight freezing) for batches of exactly ``batch`` images: smaller
        ones are padded and bigger ones split (:meth:`forward_uint8`), so it compiles once. The compile runs
        here, on a zero batch (about 30 s for a ResNet-50 on 2 CPU cores), not in the first real batch. It
        needs a C++ compiler (CPU) or Triton (GPU); when it fails the predictor stays eager and says so.
        Measured on the 2-core CPU (dmm_cnn, batch 32, bf16, batch norm folded): 61.3 -> 94.3 images/s
        (``python bench/bench_inference.py``, docs/benchmarks.md)."""
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant-fold the weights: inference only, process-wide
        compiled = torch.compile(self.model, dynamic=False)
        pre = self.preprocessing
        zeros = torch.zeros((batch, pre.channels, *pre.size), dtype=torch.uint8)
        try:
            self.forward_fn = compiled
            self.forward_uint8(zeros)
        except Exception as e:  # noqa: BLE001 - no compiler, unsupported op, ...: eager still works
            import warnings

            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); running eager", stacklevel=2)
            self.forward_fn, self.compile_batch = self.model, None

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def forward_uint8(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, C, H, W) -> raw outputs (float32, on the CPU)."""
        size, n = self.compile_batch, len(images)
        if size and n != size:  # the compiled graph takes exactly `size` images: pad to a multiple, split
            padded = torch.cat([images, images.new_zeros((-n % size, *images.shape[1:]))])
            parts = [self.forward_uint8(padded[i:i + size]) for i in range(0, len(padded), size)]
            return {k: torch.cat([p[k] for p in parts])[:n] for k in parts[0]}
        if not size and n > self.max_batch:
            parts = [self.forward_uint8(images[i:i + self.max_batch]) for i in range(0, n, self.max_batch)]
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        x = images.to(self.device, non_blocking=True)
        x = self.model.prepare(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            raw = self.model.infer(x, self.forward_fn)  # with the mirror image too where the checkpoint says
        return {k: v.float().cpu() for k, v in raw.items()}

    @property
    def parameter_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.parameters())

    def columns(self, inputs: torch.Tensor, geometry: list[dict]) -> dict[str, list]:
        """uint8 model inputs (N, C, H, W) and per input its geometry (input pixel -> original pixel: a
        ``{"affine": [6 values]}`` or ``{"sx", "sy", "tx", "ty"}``) -> the model's columns, one entry each."""
        if not len(inputs):
            return {f.name: [] for f in self.output_fields}
        h, w = self.preprocessing.size
        geometry = [{**g, "input_w": w, "input_h": h} for g in geometry]
        return self.model.to_columns(self.forward_uint8(inputs), geometry)
