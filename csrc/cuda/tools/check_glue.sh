#!/usr/bin/env bash
# Compile-checks the CUDA torch glue (csrc/cuda/*_api.cpp) on a machine without CUDA torch:
#  1. g++ -fsyntax-only of each glue file against torch's headers + the CUDA toolkit's headers;
#  2. builds and runs tools/schema_check.cpp, which checks the glue signatures against the op
#     schemas of csrc/fastattn.cpp (torch compares them at registration time).
# A CPU build of torch lacks c10/cuda/impl/cuda_cmake_macros.h (generated at torch build time);
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it here, the real CUDA build has it. Usage, from the repo
# root: csrc/cuda/tools/check_glue.sh  (CXX, PYTHON and CUDA_HOME may be overridden).
set -euo pipefail
CXX=${CXX:-g++}
PYTHON=${PYTHON:-python}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
torch_includes=$($PYTHON -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem ' + p for p in include_paths()))")
torch_lib=$($PYTHON -c "from torch.utils.cpp_extension import library_paths; print(library_paths()[0])")
flags="-std=c++17 -Wall -Wextra -DFASTATTN_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE $torch_includes -isystem $CUDA_HOME/include"

for f in "$root"/csrc/cuda/*_api.cpp; do
  echo "g++ -fsyntax-only ${f#"$root"/}"
  $CXX -fsyntax-only $flags "$f"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed -n '/^TORCH_LIBRARY(fastattn, m)/,/^}/p' "$root/csrc/fastattn.cpp" > "$work/schemas.inc"
echo "schema check against csrc/fastattn.cpp"
# -O2 drops the unused glue functions, so nothing links against CUDA.
$CXX -O2 $flags -DSCHEMAS_INC="\"$work/schemas.inc\"" "$here/schema_check.cpp" -o "$work/schema_check" \
  -L"$torch_lib" -Wl,-rpath,"$torch_lib" -ltorch -ltorch_cpu -lc10
"$work/schema_check"
