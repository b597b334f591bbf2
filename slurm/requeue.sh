# Sourced by the pretrain job scripts (from the repository root, where sbatch runs them):
#     source slurm/requeue.sh
#     run_requeueing srun "$BIN" pretrain ... --resume auto
#
# How a job survives its time limit and preemption:
# - `#SBATCH --signal=USR1@300` (no `B:`) has SLURM send SIGUSR1 to every task, 5
#   minutes before the time limit; preemption and scancel send SIGTERM to every task.
# - On either, every rank of `lit-claire pretrain` finishes the optimizer step it is in,
#   a `step-NNNNNNNN` checkpoint is written, and every process exits with status 75
#   once it is in place (0: the run finished; anything else: it failed).
# - On 75, the job requeues itself (`#SBATCH --requeue`); the requeued job continues
#   with `--resume auto` from that checkpoint, to the losses of a run never stopped.
#   A cancelled job (scancel) keeps its checkpoint and is not requeued: resubmit the
#   script to continue.
# - Under torchrun (srun ... torchrun --no-python "$BIN" pretrain ...), the workers
#   exit with 75 but torchrun itself exits with 1 after passing a signal on. Rank 0
#   also records the stop in the run folder (OUT/stopped.json, once the checkpoint is
#   in place; removed when a run starts there): a status other than 0 with a record
#   written during this command counts as 75. torchrun needs
#   `--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1` (without it SIGUSR1
#   kills the agent and leaves the workers training) and a `--shutdown-timeout` longer
#   than a checkpoint takes to write (after it, the agent kills the workers).
# srun must not use --kill-on-bad-exit: the first rank to exit with 75 would get the
# others killed, and srun would report their signal instead of 75.

LIT_CLAIRE_PREEMPTED=75

# SLURM signals the batch shell too (SIGTERM on preemption, scancel and the time
# limit). The shell must outlive srun to read its status, so it only notes them; a
# trap with a command (unlike an ignored signal) is not inherited by srun and the tasks.
trap 'echo "$(date): SIGTERM: every rank saves a checkpoint and stops"' TERM
trap 'echo "$(date): SIGUSR1: every rank saves a checkpoint and stops"' USR1

# The value of --out-dir among "$@" (empty if none).
lit_claire_out_dir() {
    local prev=""
    for arg in "$@"; do
        case "$arg" in
            --out-dir=*) echo "${arg#--out-dir=}"; return ;;
        esac
        if [ "$prev" = "--out-dir" ]; then echo "$arg"; return; fi
        prev=$arg
    done
}

# Inode and modification time of OUT/stopped.json, or "none".
lit_claire_stop_record() {
    stat -c '%i %y' "$1/stopped.json" 2>/dev/null || echo none
}

# Run "$@" (srun ... pretrain ...); on status 75 requeue the job, unless it was
# cancelled. Returns the command's status otherwise (0 once requeued).
run_requeueing() {
    local status=0 out before
    out=$(lit_claire_out_dir "$@")
    # The record as it was (inode and modification time, or none): one written during
    # the command is another file (written under a temporary name, then renamed).
    before=$(lit_claire_stop_record "$out")
    "$@" || status=$?
    if [ "$status" -ne 0 ] && [ "$status" -ne "$LIT_CLAIRE_PREEMPTED" ] && [ -n "$out" ] &&
        [ -f "$out/stopped.json" ] && [ "$(lit_claire_stop_record "$out")" != "$before" ]; then
        echo "$(date): the launcher exited with $status, but the run stopped on request after writing a checkpoint ($out/stopped.json)"
        status=$LIT_CLAIRE_PREEMPTED
    fi
    if [ "$status" -ne "$LIT_CLAIRE_PREEMPTED" ]; then
        return "$status"
    fi
    if scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -q 'JobState=CANCELLED'; then
        echo "$(date): job $SLURM_JOB_ID was cancelled; its checkpoint is saved and it is not requeued (resubmit to continue)"
        return 0
    fi
    echo "$(date): stopped after a checkpoint; requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        echo "$(date): scontrol requeue $SLURM_JOB_ID failed (is #SBATCH --requeue set?); resubmit the script to continue the run"
        return "$LIT_CLAIRE_PREEMPTED"
    fi
    return 0
}
