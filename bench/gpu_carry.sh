#!/usr/bin/env bash
# Before a GPU lease, on this machine: the wheels the lent machine's image lacks, for its
# Python 3.12 (its torch, torchvision, timm, numpy, pandas, psutil and aiohttp are used as
# they are), packed into pieces of at most 50 MiB, because one device call carries 64 MiB with the tree and
# Ray's wheel alone is 79 MB. Writes .gpu-carry/part-1 ... part-N and .gpu-old/ (the code of
# commit fc35826), all git-ignored.
#
#   bench/gpu_carry.sh            # then bench/gpu_run.sh, as docs/benchmarks.md says
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qxF '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo '/.gpu-carry/' >>.git/info/exclude
grep -qxF '/.gpu-stage/' .git/info/exclude 2>/dev/null || echo '/.gpu-stage/' >>.git/info/exclude
grep -qxF '/.gpu-old/' .git/info/exclude 2>/dev/null || echo '/.gpu-old/' >>.git/info/exclude

# the pretraining step before its crops were batched (commit fc35826), for old against new
rm -rf .gpu-old && mkdir .gpu-old && git archive fc35826 platform bench jobs | tar -x -C .gpu-old

# the project's pins (constraints.txt) for what it imports on the screening and pretraining
# paths, and what those need beyond the image's packages
pin() { grep -i "^$1==" constraints.txt; }
wheels=(
  "$(pin ray)" "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)"
  "$(pin typing-inspection)" "$(pin openslide-python)" "$(pin openslide-bin)"
  "$(pin imagecodecs)" "$(pin pillow)" "$(pin pyarrow)" "$(pin tifffile)" "$(pin safetensors)"
  "$(pin jsonschema)" "$(pin jsonschema-specifications)" "$(pin referencing)" "$(pin rpds-py)"
  "$(pin msgpack)" "$(pin protobuf)" "$(pin fsspec)"
)
rm -rf .gpu-carry && mkdir -p .gpu-carry/wheels
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64 any; do platforms+=(--platform "$p"); done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .gpu-carry/wheels "${wheels[@]}"
tar -C .gpu-carry -cf .gpu-carry/wheels.tar wheels
rm -r .gpu-carry/wheels
split -b 50m -d -a 1 .gpu-carry/wheels.tar .gpu-carry/wheels.tar.
rm .gpu-carry/wheels.tar
n=0
for piece in .gpu-carry/wheels.tar.*; do
  n=$((n + 1))
  mkdir -p ".gpu-carry/part-$n" && mv "$piece" ".gpu-carry/part-$n/"
done
du -sh .gpu-carry/part-* && echo "$n pieces: carry each in its own call (docs/benchmarks.md)"
