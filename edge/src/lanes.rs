//! Store lanes: threads of a shard that run its blocking store work, each fed by a bounded
//! queue.
//!
//! A shard has four (docs/decisions/0008-per-shard-stores.md):
//! - the **writer** runs group commits, one at a time, so an fsync never blocks the executor
//!   and no other shard's commit ever waits behind it;
//! - the **syncer** makes a written commit durable (the log engine's fsync, decision 0027)
//!   while the writer writes the next one;
//! - the **reader** runs sync reads (fjall snapshots: no writer lock; a commit only in the rare
//!   read that raises a store's clock mark, decision 0047), so a reconnect storm that reads
//!   thousands of pages never stalls a commit;
//! - **maintenance** runs the expiry and erase passes, which can take long.
//!
//! The executor hands a closure to a lane and awaits its result; the lane's thread wakes the
//! waiting task. glommio queues a wake from another thread and writes its eventfd only when
//! the executor is about to sleep, so a busy shard takes completions without a system call.
//! With `server.pin_shards` the lanes run on the shard's core: a wake-up then never needs an
//! interrupt to another core.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Work handed to a lane.
type Job = Box<dyn FnOnce() + Send>;

/// One thread and its bounded queue of jobs.
#[derive(Debug, Clone)]
pub struct Lane {
    jobs: flume::Sender<Job>,
    name: String,
    /// Jobs that found the queue full and wait to be sent (`run`): while there are any, a new
    /// job waits behind them instead of taking a freed place first. Waiting jobs are sent in
    /// the order their futures are first polled, which for a shard's tasks is the order it
    /// spawned them: jobs run in the order they were handed over.
    deferred: Arc<AtomicUsize>,
}

/// The lane's thread is gone (it can only end by a panic, which ends the process).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the store thread {0} stopped")]
pub struct LaneStopped(pub String);

impl Lane {
    /// Starts a lane thread named `name` whose queue holds at most `queued_jobs_max` jobs,
    /// pinned to `cpu` if given, at nice value `nice` if not 0.
    pub fn start(
        name: String,
        queued_jobs_max: usize,
        cpu: Option<usize>,
        nice: i32,
    ) -> Result<Lane, String> {
        let (jobs, queue) = flume::bounded::<Job>(queued_jobs_max.max(1));
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Some(cpu) = cpu
                    && let Err(error) = pin_current_thread(cpu)
                {
                    tracing::warn!(cpu, %error, "cannot pin a store thread to its shard's core");
                }
                if nice != 0
                    && let Err(error) = set_current_thread_nice(nice)
                    && !NICE_REFUSAL_LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(
                        nice,
                        %error,
                        "cannot raise the store writer threads' priority: commits then wait for \
                         their shard's time slice under load. Allow it with CAP_SYS_NICE or \
                         RLIMIT_NICE (systemd: LimitNICE=-10), or set server.store_writer_nice = 0"
                    );
                }
                while let Ok(job) = queue.recv() {
                    job();
                }
            })
            .map_err(|error| format!("cannot start store thread {name}: {error}"))?;
        Ok(Lane {
            jobs,
            name,
            deferred: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Runs `work` on the lane's thread; the future gives its result.
    ///
    /// The job is handed over now, when the queue has room: the lane's thread starts while
    /// the caller goes on, not when an executor next polls the future (at 10,000 msgs/s, with
    /// each sync taking 250 µs or more, a busy shard polled a commit's task 0.26–0.5 ms after
    /// it was spawned, on average; decision 0008). With the queue full the future waits for
    /// room: a full lane slows its callers down instead of growing. A job handed over at once
    /// runs even if the future is dropped; one still waiting for room does not.
    pub fn run<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
    ) -> impl Future<Output = Result<R, LaneStopped>> + 'static {
        // The reply wakes the executor only after it has let go of its own lock. A flume
        // channel wakes an async receiver while holding the channel's mutex: when the woken
        // shard ran before the lane thread let go (seen under `strace`, rare otherwise), it
        // blocked on that mutex (docs/benchmarks.md, fifteenth session).
        let (reply, result) = futures_channel::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = reply.send(work());
        });
        // Full or gone: sent (or found gone) when the future is polled.
        let unsent = if self.deferred.load(Ordering::Acquire) > 0 {
            Some(job)
        } else {
            self.jobs
                .try_send(job)
                .err()
                .map(flume::TrySendError::into_inner)
        };
        let waiting = unsent.map(|job| {
            self.deferred.fetch_add(1, Ordering::AcqRel);
            let counted = Deferred(Arc::clone(&self.deferred));
            (job, self.jobs.clone(), counted)
        });
        let name = self.name.clone();
        async move {
            if let Some((job, jobs, counted)) = waiting {
                jobs.send_async(job)
                    .await
                    .map_err(|_| LaneStopped(name.clone()))?;
                // Sent: jobs handed over from now on may take a place at once.
                drop(counted);
            }
            result.await.map_err(|_| LaneStopped(name))
        }
    }
}

/// One job waiting for room in its lane's queue, counted in `Lane::deferred` until it is sent
/// or its future is dropped.
struct Deferred(Arc<AtomicUsize>);

impl Drop for Deferred {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Lane {
    /// Runs store work on the lane; a stopped lane reads as a store I/O error, which the
    /// callers already retry or report.
    pub fn run_store<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<R, courier_core::store::StoreError> + Send + 'static,
    ) -> impl Future<Output = Result<R, courier_core::store::StoreError>> + 'static {
        let ran = self.run(work);
        async move {
            ran.await.unwrap_or_else(|stopped| {
                Err(courier_core::store::StoreError::Io(stopped.to_string()))
            })
        }
    }
}

/// The writer, syncer, reader and maintenance lanes of one shard.
#[derive(Debug, Clone)]
pub struct StoreLanes {
    pub writer: Lane,
    pub syncer: Lane,
    pub reader: Lane,
    pub maintenance: Lane,
}

impl StoreLanes {
    /// Starts the lanes of shard `shard`; reads queue at most `reads_queued_max` deep, and
    /// the writer runs at nice value `writer_nice` (`server.store_writer_nice`).
    pub fn start(
        shard: u8,
        reads_queued_max: usize,
        cpu: Option<usize>,
        writer_nice: i32,
    ) -> Result<StoreLanes, String> {
        Ok(StoreLanes {
            // One commit is written at a time per shard; room for two keeps the lane busy.
            writer: Lane::start(format!("store-w{shard}"), 2, cpu, writer_nice)?,
            // At most two batches are in flight (`batching.batches_in_flight_max`).
            syncer: Lane::start(format!("store-s{shard}"), 2, cpu, writer_nice)?,
            reader: Lane::start(format!("store-r{shard}"), reads_queued_max, cpu, 0)?,
            maintenance: Lane::start(format!("store-m{shard}"), 2, cpu, 0)?,
        })
    }
}

/// Whether a refused priority was logged: once per process, not once per shard.
static NICE_REFUSAL_LOGGED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Sets the calling thread's nice value (Linux schedules threads, so this is per thread).
#[allow(unsafe_code)]
fn set_current_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
    unsafe {
        let tid = libc::gettid();
        if libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Pins the calling thread to one CPU.
#[allow(unsafe_code)]
fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data, zeroed then filled by CPU_SET; sched_setaffinity reads
    // it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_runs_work_on_its_thread_and_returns_the_result() {
        let lane = Lane::start("test-lane".into(), 1, None, 0).expect("lane starts");
        let results = glommio::LocalExecutorBuilder::default()
            .io_memory(64 * 1024)
            .spawn(move || async move {
                let mut results = Vec::new();
                for i in 0..10u32 {
                    let thread = lane
                        .run(move || (i * 2, std::thread::current().name().map(String::from)))
                        .await
                        .expect("lane runs");
                    results.push(thread);
                }
                results
            })
            .expect("executor starts")
            .join()
            .expect("executor ends");
        assert_eq!(results.len(), 10);
        for (i, (doubled, thread)) in results.into_iter().enumerate() {
            assert_eq!(doubled, 2 * i as u32);
            assert_eq!(thread.as_deref(), Some("test-lane"));
        }
    }

    #[test]
    fn work_is_handed_to_the_lane_before_its_future_is_polled() {
        // A busy shard polls a new task late: the lane must not wait for that.
        let lane = Lane::start("test-lane-eager".into(), 1, None, 0).expect("lane starts");
        let (ran, ran_rx) = std::sync::mpsc::channel();
        let future = lane.run(move || ran.send(()).expect("test waits"));
        ran_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the job ran without its future being polled");
        drop(future);
    }

    #[test]
    fn jobs_run_in_the_order_they_were_handed_over_when_the_queue_is_full() {
        let lane = Lane::start("test-lane-order".into(), 1, None, 0).expect("lane starts");
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let job = |name: &'static str| {
            let order = std::sync::Arc::clone(&order);
            move || order.lock().expect("not poisoned").push(name)
        };
        // The lane's thread is held inside a first job; `a` takes the queue's one place.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (holding, held) = std::sync::mpsc::channel();
        let blocker = lane.run(move || {
            holding.send(()).expect("test waits");
            released.recv().expect("test releases");
        });
        held.recv().expect("the lane holds");
        let a = lane.run(job("a"));
        // Full: `b` waits to be sent.
        let b = lane.run(job("b"));
        release.send(()).expect("lane waits");
        futures_lite::future::block_on(async {
            blocker.await.expect("lane runs");
            a.await.expect("lane runs");
        });
        // The queue has room again, but `b` was handed over first: `c` waits behind it.
        let c = lane.run(job("c"));
        futures_lite::future::block_on(async {
            b.await.expect("lane runs");
            c.await.expect("lane runs");
        });
        assert_eq!(*order.lock().expect("not poisoned"), ["a", "b", "c"]);
    }

    #[test]
    fn work_that_panics_reads_as_a_stopped_lane_not_a_hang() {
        let lane = Lane::start("test-lane-panics".into(), 1, None, 0).expect("lane starts");
        let result = glommio::LocalExecutorBuilder::default()
            .io_memory(64 * 1024)
            .spawn(move || async move { lane.run(|| -> u32 { panic!("a store bug") }).await })
            .expect("executor starts")
            .join()
            .expect("executor ends");
        assert_eq!(result, Err(LaneStopped("test-lane-panics".into())));
    }

    /// The thread's own nice value, as the scheduler sees it.
    #[allow(unsafe_code)]
    fn current_thread_nice() -> i32 {
        // SAFETY: plain integers in and out. getpriority returns the nice value itself (it
        // can be -1), so errno tells a failure apart.
        unsafe {
            *libc::__errno_location() = 0;
            let nice = libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t);
            assert_eq!(*libc::__errno_location(), 0, "getpriority failed");
            nice
        }
    }

    #[test]
    fn a_lane_runs_at_its_nice_value_and_others_at_the_process_s() {
        // Raising a nice value (lowering the priority) needs no privilege, so the test runs
        // anywhere; lowering it below the process's is what the writer lane does in production.
        let process_nice = current_thread_nice();
        // Never 0: that means "leave the thread as the process is".
        let target = match (process_nice + 5).min(19) {
            0 => 1,
            target => target,
        };
        let niced = Lane::start("test-niced".into(), 1, None, target).expect("lane starts");
        let plain = Lane::start("test-plain".into(), 1, None, 0).expect("lane starts");
        let (niced_value, plain_value) = glommio::LocalExecutorBuilder::default()
            .io_memory(64 * 1024)
            .spawn(move || async move {
                (
                    niced.run(current_thread_nice).await.expect("lane runs"),
                    plain.run(current_thread_nice).await.expect("lane runs"),
                )
            })
            .expect("executor starts")
            .join()
            .expect("executor ends");
        assert_eq!(niced_value, target, "the lane's thread took its nice value");
        assert_eq!(
            plain_value, process_nice,
            "a lane without one keeps the process's"
        );
    }
}
