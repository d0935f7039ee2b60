#!/usr/bin/env bash
# Create the separate venv that runs TRL 0.7.11 itself (for bench_ppo.py and bench_ddpo.py).
#
#   bash experiments/benchmarks/trl_env.sh [VENV_DIR]   (default: .trl-venv in the repository root)
#
# TRL 0.7.11 imports `top_k_top_p_filtering` from transformers, which 4.39 removed,
# so transformers is pinned to 4.38.2. torch 2.13.0 exactly: it installs from a
# local CPU wheel (any other version pulls a multi-GB CUDA build). The rest is what
# pip resolved on 2026-11-25 and bench_ppo.py ran with (PPOTrainer generate + step):
# accelerate 1.15.0, numpy 2.4.6, datasets 5.0.1, tokenizers 0.15.2,
# huggingface_hub 0.36.2, safetensors 0.8.0, tyro 1.0.17; accelerate is pinned.
# DDPO (bench_ddpo.py) also needs diffusers and, for use_lora=True, peft. diffusers 0.29.2 is the
# oldest that imports here: 0.27.2 and 0.28.2 import `cached_download`, which huggingface_hub 0.26
# removed (this venv has 0.36.2, which transformers 4.38.2 accepts). peft 0.10.0 is the release of
# TRL 0.7.11's time (Mar 2024); both ran TRL's DDPOTrainer on 2026-12-02.
set -euo pipefail
VENV="${1:-$(cd "$(dirname "$0")/../.." && pwd)/.trl-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet \
  "trl==0.7.11" "transformers==4.38.2" "accelerate==1.15.0" "torch==2.13.0" safetensors \
  "diffusers==0.29.2" "peft==0.10.0"
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl, accelerate, diffusers, peft
from trl import DDPOTrainer  # needs diffusers
print("trl", trl.__version__, "transformers", transformers.__version__,
      "torch", torch.__version__, "accelerate", accelerate.__version__,
      "diffusers", diffusers.__version__, "peft", peft.__version__)
PY
