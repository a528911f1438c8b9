#!/usr/bin/env bash
# Grid sweep: bash launch/sweep.sh RECIPE "key=v1,v2" ["key2=a,b" ...]; one work dir per grid point.
set -euo pipefail
recipe=$1; shift
points=("")
for axis in "$@"; do
  key=${axis%%=*}; IFS=, read -ra vals <<<"${axis#*=}"
  next=()
  for p in "${points[@]}"; do for v in "${vals[@]}"; do next+=("$p --config.$key=$v"); done; done
  points=("${next[@]}")
done
for p in "${points[@]}"; do
  tag=$(echo "$p" | sed 's/--config\.//g; s/[ =]/_/g; s/^_//')
  echo "== $recipe $p"
  rwml-jax run "$recipe" $p --config.work_dir="runs/sweep/${recipe}/${tag}"
done
