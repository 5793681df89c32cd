//! The job commands: `query-jobs`, `job-*`, `query-block-jobs`, `block-job-*`.
//!
//! The generic `job-*` commands and the older `block-job-*` ones act on the same jobs with
//! the same verbs; they differ only where QEMU's do: an unknown id is GenericError
//! `Job not found` for the first and DeviceNotActive `Block job 'x' not found` for the
//! second, and only `block-job-cancel` refuses a paused job without `force`.

use std::sync::Arc;

use crate::generated::{BlockJobInfo, JobInfo};
use crate::jobs::Job;
use crate::state::State;
use crate::{ErrorClass, QmpError};

/// The job `id` for a `job-*` command.
fn job(st: &State, id: &str) -> Result<Arc<Job<State>>, QmpError> {
    st.jobs
        .get(id)
        .ok_or_else(|| QmpError::generic("Job not found"))
}

/// The job `id` for a `block-job-*` command.
fn block_job(st: &State, id: &str) -> Result<Arc<Job<State>>, QmpError> {
    st.jobs.get(id).filter(|j| j.is_block()).ok_or_else(|| {
        QmpError::new(
            ErrorClass::DeviceNotActive,
            format!("Block job '{id}' not found"),
        )
    })
}

pub(crate) fn query_jobs(st: &mut State) -> Vec<JobInfo> {
    st.jobs.iter().map(|j| j.info()).collect()
}

pub(crate) fn query_block_jobs(st: &mut State) -> Vec<BlockJobInfo> {
    st.jobs
        .iter()
        .filter(|j| j.is_block())
        .map(|j| j.block_info())
        .collect()
}

pub(crate) fn pause(st: &mut State, id: &str, block: bool) -> Result<(), QmpError> {
    let j = if block {
        block_job(st, id)?
    } else {
        job(st, id)?
    };
    j.pause()
}

pub(crate) fn resume(st: &mut State, id: &str, block: bool) -> Result<(), QmpError> {
    let j = if block {
        block_job(st, id)?
    } else {
        job(st, id)?
    };
    j.resume()
}

pub(crate) fn complete(st: &mut State, id: &str, block: bool) -> Result<(), QmpError> {
    let j = if block {
        block_job(st, id)?
    } else {
        job(st, id)?
    };
    j.complete()
}

pub(crate) fn finalize(st: &mut State, id: &str, block: bool) -> Result<(), QmpError> {
    let j = if block {
        block_job(st, id)?
    } else {
        job(st, id)?
    };
    j.finalize(st)
}

pub(crate) fn dismiss(st: &mut State, id: &str, block: bool) -> Result<(), QmpError> {
    let j = if block {
        block_job(st, id)?
    } else {
        job(st, id)?
    };
    j.dismiss(st)
}

/// `job-cancel` (always forced, as QEMU's) and `block-job-cancel`.
pub(crate) fn cancel(st: &mut State, id: &str, block: bool, force: bool) -> Result<(), QmpError> {
    let j = if block {
        block_job(st, id)?
    } else {
        job(st, id)?
    };
    j.cancel(st, force || !block)
}

pub(crate) fn set_speed(st: &mut State, id: &str, speed: i64) -> Result<(), QmpError> {
    block_job(st, id)?.set_speed(speed)
}

pub(crate) fn change(
    st: &mut State,
    opts: &crate::generated::BlockJobChangeOptions,
) -> Result<(), QmpError> {
    block_job(st, &opts.id)?.change(opts)
}
