#!/bin/sh
# CMAKE_CUDA_COMPILER_LAUNCHER: run nvcc, keep its stderr (ptxas -v resource usage) beside the
# object as <object>.ptxas, and still show it. Exit status is nvcc's.
obj=""
prev=""
for a in "$@"; do
  [ "$prev" = "-o" ] && obj="$a"
  prev="$a"
done
log="${obj:-nvcc}.ptxas"
"$@" 2>"$log"
status=$?
cat "$log" >&2
exit $status
