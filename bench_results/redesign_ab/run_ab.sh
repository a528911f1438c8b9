#!/usr/bin/env bash
# Interleaved A/B: the redesign against the commit before it (f5ecd1d), tiny generate and tiny GRPO iteration,
# three rounds, the order alternating each round. Usage (two checkouts, e.g. `git worktree add OLD f5ecd1d`):
#   NEW_TREE=$PWD OLD_TREE=/path/to/OLD OUT=/tmp/ab bash bench_results/redesign_ab/run_ab.sh
set -u
out=$(realpath -m "${OUT:-bench_results/redesign_ab}"); mkdir -p "$out"
run() {  # name tree kind round
  local name=$1 tree=$2 kind=$3 r=$4
  cd $tree
  if [ $kind = gen ]; then
    PYTHONPATH=$tree timeout 900 python3 -m rwml_jax.bench.generate_bench --shapes tiny --no-peer --repeats 5 --json $out/gen_${name}_$r.json > $out/gen_${name}_$r.log 2>&1
  else
    PYTHONPATH=$tree timeout 1200 python3 -m rwml_jax.bench.grpo_bench --shapes tiny --no-peer --steps 5 --warmup 1 --json $out/grpo_${name}_$r.json > $out/grpo_${name}_$r.log 2>&1
  fi
}
for r in 1 2 3; do
  for kind in gen grpo; do
    if [ $((r % 2)) = 1 ]; then run new $NEW_TREE $kind $r; run old $OLD_TREE $kind $r
    else run old $OLD_TREE $kind $r; run new $NEW_TREE $kind $r; fi
  done
done
echo AB-DONE
