#!/usr/bin/env bash
# Submit a whole dmriharmony study to SLURM: the participant level as a job array (one task
# per sub-* folder of the BIDS dataset, scripts/slurm/participant_array.sbatch), then the
# group level as one job that starts only when every array task succeeded
# (--dependency=afterok).
#
#   scripts/slurm/submit_study.sh BIDS_DIR OUTPUT_DIR [-- EXTRA_PARTICIPANT_ARGS...]
#
# Environment (all optional):
#   WORK            root of the per-participant work folders (default OUTPUT_DIR/work)
#   SUBJECTS        subject list to write and use (default OUTPUT_DIR/slurm/subjects.txt);
#                   with KEEP_SUBJECTS=1 an existing list is used as it is (e.g. a subset)
#   DMRIHARMONY     the command (default dmriharmony; e.g. "apptainer run --cleanenv
#                   -B /data dmriharmony.sif")
#   TEMPLATE_ARGS   TBSS options of the participant level (default "--template phantom")
#   SBATCH_ARGS     sbatch options for both steps (e.g. "-p debug --account=lab")
#   ARRAY_SBATCH_ARGS, GROUP_SBATCH_ARGS   sbatch options for one step only
#   MAX_PARALLEL    at most this many array tasks at once (--array=1-N%MAX_PARALLEL)
#   GROUP_ARGS      options of the group level (default "--harmonizers combat,meta,mixed
#                   --covariates age,sex --effect dx")
#   NO_GROUP=1      submit the participant array only
#   DRY_RUN=1       print the sbatch commands instead of running them
# Prints the job ids ("participant array: JOBID", "group: JOBID"); job logs go to
# OUTPUT_DIR/slurm/logs. Exit status: 0 submitted, 64 usage, 66 no sub-* folders, else the
# status of the failing sbatch.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "submit_study: error: $*" >&2; exit "${2:-64}"; }

[ $# -ge 2 ] || die "usage: submit_study.sh BIDS_DIR OUTPUT_DIR [-- EXTRA_PARTICIPANT_ARGS...]"
bids=$(cd "$1" 2>/dev/null && pwd) || die "$1: no such folder" 66
mkdir -p "$2" || die "$2: cannot create the output folder" 73
out=$(cd "$2" && pwd)
shift 2
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
work=${WORK:-$out/work}
subjects=${SUBJECTS:-$out/slurm/subjects.txt}
logs=$out/slurm/logs
mkdir -p "$logs" "$(dirname "$subjects")"

if [ "${KEEP_SUBJECTS:-0}" = 1 ] && [ -s "$subjects" ]; then
  :
else
  find "$bids" -mindepth 1 -maxdepth 1 -type d -name 'sub-*' -printf '%f\n' | LC_ALL=C sort \
    >"$subjects.tmp"
  mv "$subjects.tmp" "$subjects"
fi
n=$(grep -c . "$subjects" || true)
[ "$n" -gt 0 ] || die "$bids: no sub-* folders (subject list $subjects is empty)" 66
array="1-$n${MAX_PARALLEL:+%$MAX_PARALLEL}"

read -r -a common <<<"${SBATCH_ARGS:-}"
read -r -a array_args <<<"${ARRAY_SBATCH_ARGS:-}"
read -r -a group_args <<<"${GROUP_SBATCH_ARGS:-}"
read -r -a cmd <<<"${DMRIHARMONY:-dmriharmony}"
read -r -a group_opts <<<"${GROUP_ARGS:---harmonizers combat,meta,mixed --covariates age,sex --effect dx}"

submit() {  # prints the job id
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' sbatch "$@" >&2
    echo >&2
    echo "DRYRUN$RANDOM"
  else
    sbatch "$@"
  fi
}

# DMRIHARMONY and TEMPLATE_ARGS reach the array tasks through the environment: keep sbatch's
# default --export=ALL (an --export=NONE in SBATCH_ARGS would drop them).
export DMRIHARMONY=${DMRIHARMONY:-dmriharmony}
export TEMPLATE_ARGS=${TEMPLATE_ARGS---template phantom}
jid=$(submit --parsable --job-name=dmriharmony-participant --array="$array" \
  --output="$logs/participant-%A_%a.out" "${common[@]}" "${array_args[@]}" \
  "$here/participant_array.sbatch" "$subjects" "$bids" "$out" "$work" -- "$@")
jid=${jid%%;*}  # --parsable prints "jobid[;cluster]"
echo "participant array: $jid ($n task(s), subjects in $subjects)"

if [ "${NO_GROUP:-0}" = 1 ]; then
  exit 0
fi
wrap=$(printf '%q ' "${cmd[@]}" "$bids" "$out" group "${group_opts[@]}")
gid=$(submit --parsable --job-name=dmriharmony-group --dependency="afterok:$jid" \
  --kill-on-invalid-dep=yes --output="$logs/group-%j.out" "${common[@]}" "${group_args[@]}" \
  --wrap "$wrap")
gid=${gid%%;*}
echo "group: $gid (after array $jid succeeds)"
