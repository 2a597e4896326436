"""The low-label benchmark on real data (Dataset004_Hippocampus): does RN-DPO help, and is it stable, under
reliable and weak judges? Run it as `python -m benchmarks.low_label` from the repository root.

Protocols (`--protocol`, protocols.py): v2 (network 16-128 on the 3d_fullres patch, 5,000 base and 2,000
fine-tuning iterations, 20 validation iterations per epoch), built to see a gain: sanity arms first (upper bound,
RN-DPO and self-training with the reliable oracle), which gate the rest on the validation split; then the oracle
reliability sweep (noise_std 0.01-0.3) and the label-free judges, each with RN-DPO and self-training; then seeds 1
and 2 of the best label-free judge (chosen by its top-1 lift in the validation audit). v3 is v2 with 5 labeled and
20 validation cases (v2's upper bound sat only 1.1 points above its base on the CPU). folds is v3's split with
nnU-Net's 5-fold cross-validation of the labeled cases: five fold models, their ensemble, each fold fine-tuned with
the other folds' members (plan_folds.py). The first protocol, v1 (network 8-64, 3,000 base and 300 fine-tuning
iterations), is retired; its results in benchmarks/results/low_label/ still load and report.

    python -m benchmarks.low_label --protocol v2 --work bench_output/low_label_v2 --device cuda
    python -m benchmarks.low_label --protocol v3 --work /work/bench_v3 --data ../shared/data/Dataset004_Hippocampus
    python -m benchmarks.low_label ... --only base_s0 rn_dpo_agreement_top_bottom_s0   # a subset
    python -m benchmarks.low_label ... --part_id 0 --num_parts 2                        # shard the arms
    python -m benchmarks.low_label ... --report BENCHMARKS_low_label.md                # summarise finished arms
    python -m benchmarks.low_label ... --pack DIR     # then on a new machine --unpack DIR: the run goes on

Protocol (fixed seed, split written to <work>/split.json): L labeled training cases, V labeled validation
cases (checkpoint selection and setting choices only), U unlabeled cases (imagesUnlabeled; their labels sit in
labelsUnlabeled, read only by the oracle judge and the upper bound), T test cases (the rest, never used for
any choice). Every arm of a seed continues from the same base model. Each finished arm writes
<work>/arms/<arm>.json and is skipped on a rerun.

Modules: catalogue (judges, preference variants, proposal recipes), protocols, arms (an arm as a value, its
name), plans (arm builders and the choices read from validation) with plan_v2, plan_cross_seed and plan_folds
(each plan a list of stages), scheduling (claims, waits, parts, running stages), data (split, datasets), models
(an arm's nnU-Net model folder), runner (train, score, record, audit), results, statistics (paired differences),
timings, report, reliability and report_folds (the report), carry (a run moved to a new machine: --pack, --unpack),
__main__ (the command line).
"""
