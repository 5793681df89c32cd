//! The job commands: `query-jobs`, `job-*`, `query-block-jobs`, `block-job-*`.
//!
//! The generic `job-*` commands and the older `block-job-*` ones act on the same jobs with
//! the same verbs; they differ only where QEMU's do: an unknown id is GenericError
//! `Job not found` for the first and DeviceNotActive `Block job 'x' not found` for the
//! second, and only `block-job-cancel` refuses a paused job without `force`.

use std::sync::Arc;

use crate::commands::Session;
use crate::generated::{BlockJobInfo, JobInfo};
use crate::jobs::Job;
use crate::{ErrorClass, QmpError};

/// The job `id` for a `job-*` command.
fn job(s: &Session<'_>, id: &str) -> Result<Arc<Job>, QmpError> {
    s.state
        .jobs
        .get(id)
        .ok_or_else(|| QmpError::generic("Job not found"))
}

/// The job `id` for a `block-job-*` command.
fn block_job(s: &Session<'_>, id: &str) -> Result<Arc<Job>, QmpError> {
    s.state.jobs.get(id).ok_or_else(|| {
        QmpError::new(
            ErrorClass::DeviceNotActive,
            format!("Block job '{id}' not found"),
        )
    })
}

pub(crate) fn query_jobs(s: &mut Session<'_>) -> Vec<JobInfo> {
    s.state.jobs.iter().map(|j| j.info()).collect()
}

pub(crate) fn query_block_jobs(s: &mut Session<'_>) -> Vec<BlockJobInfo> {
    s.state.jobs.iter().map(|j| j.block_info()).collect()
}

pub(crate) fn pause(s: &mut Session<'_>, id: &str, block: bool) -> Result<(), QmpError> {
    let j = if block {
        block_job(s, id)?
    } else {
        job(s, id)?
    };
    j.pause()
}

pub(crate) fn resume(s: &mut Session<'_>, id: &str, block: bool) -> Result<(), QmpError> {
    let j = if block {
        block_job(s, id)?
    } else {
        job(s, id)?
    };
    j.resume()
}

pub(crate) fn complete(s: &mut Session<'_>, id: &str, block: bool) -> Result<(), QmpError> {
    let j = if block {
        block_job(s, id)?
    } else {
        job(s, id)?
    };
    j.complete()
}

pub(crate) fn finalize(s: &mut Session<'_>, id: &str, block: bool) -> Result<(), QmpError> {
    let j = if block {
        block_job(s, id)?
    } else {
        job(s, id)?
    };
    j.finalize(s.state)
}

pub(crate) fn dismiss(s: &mut Session<'_>, id: &str, block: bool) -> Result<(), QmpError> {
    let j = if block {
        block_job(s, id)?
    } else {
        job(s, id)?
    };
    j.dismiss(s.state)
}

/// `job-cancel` (always forced, as QEMU's) and `block-job-cancel`.
pub(crate) fn cancel(
    s: &mut Session<'_>,
    id: &str,
    block: bool,
    force: bool,
) -> Result<(), QmpError> {
    let j = if block {
        block_job(s, id)?
    } else {
        job(s, id)?
    };
    j.cancel(s.state, force || !block)
}

pub(crate) fn set_speed(s: &mut Session<'_>, id: &str, speed: i64) -> Result<(), QmpError> {
    block_job(s, id)?.set_speed(speed)
}
